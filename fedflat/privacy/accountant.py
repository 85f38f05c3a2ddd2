"""A privacy accountant for one run: run-length bookkeeping over ``accounting``.

One ``Accountant`` tracks one neighbouring relation: user-level (one step per round, q =
expected clients per round / population) or sample-level for one client (one step per
local DP-SGD step, q = expected batch size / the client's sample count). Keep them
separate and report them separately (PRIVACY.md). The bookkeeping follows Opacus'
``IAccountant`` (https://github.com/pytorch/opacus, ``accountants/accountant.py``): a
run-length history of (σ, q, steps); the mathematics lives in ``fedflat.privacy.accounting``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedflat.privacy.accounting import (
    AccountantName,
    Conversion,
    EpsilonResult,
    HistoryEntry,
    check_accountant,
    check_history_entry,
    compute_epsilon,
)

STATE_KEYS = ("mechanism", "conversion", "orders", "history")


class Accountant:
    """Privacy ledger of one run (or of one client's records).

    Args:
        accountant: "rdp", "prv" or "pld" (see ``fedflat.privacy.accounting``).
        conversion: RDP → (ε, δ) conversion, "balle" or "classic" (RDP only).
        orders: RDP orders (RDP only); default Opacus' grid.

    Example:
        >>> acc = Accountant()
        >>> for _ in range(750):
        ...     acc.step(1.8408203125, 0.04)
        >>> acc.history
        [(1.8408203125, 0.04, 750)]
        >>> round(acc.epsilon(1e-5), 3)
        2.996
    """

    def __init__(
        self,
        *,
        accountant: AccountantName = "rdp",
        conversion: Conversion = "balle",
        orders: Sequence[float] | None = None,
    ) -> None:
        self._orders = check_accountant(accountant, conversion, orders)
        self._mechanism: str = accountant
        self._conversion: str = conversion
        self.history: list[HistoryEntry] = []

    @property
    def mechanism(self) -> str:
        """The accountant's name ("rdp", "prv" or "pld")."""
        return self._mechanism

    @property
    def conversion(self) -> str:
        """The RDP conversion ("balle" or "classic")."""
        return self._conversion

    @property
    def orders(self) -> tuple[float, ...] | None:
        """The RDP orders, or ``None`` for the default grid."""
        return self._orders

    @property
    def total_steps(self) -> int:
        """Number of steps recorded (the sum over entries, not the entry count)."""
        return sum(t for _, _, t in self.history)

    def _extended(self, entry: HistoryEntry) -> list[HistoryEntry]:
        # Run-length merge of a new entry; never mutates self.history.
        hist = list(self.history)
        if entry[2] == 0:
            return hist
        if hist and hist[-1][0] == entry[0] and hist[-1][1] == entry[1]:
            hist[-1] = (entry[0], entry[1], hist[-1][2] + entry[2])
        else:
            hist.append(entry)
        return hist

    def step(
        self, noise_multiplier: float, sampling_rate: float, steps: int = 1
    ) -> None:
        """Record ``steps`` steps of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: σ ≥ 0 (noise std / L2 sensitivity).
            sampling_rate: Poisson sampling rate q ∈ [0, 1].
            steps: number of identical steps, ≥ 0.

        Raises:
            ValueError: on an invalid argument (the history is left unchanged).
        """
        self.history = self._extended(
            check_history_entry(noise_multiplier, sampling_rate, steps)
        )

    def privacy_spent(self, delta: float) -> EpsilonResult:
        """ε so far at ``delta``, with the accountant used and any note."""
        return compute_epsilon(
            self.history,
            delta=delta,
            accountant=self._mechanism,  # type: ignore[arg-type]
            conversion=self._conversion,  # type: ignore[arg-type]
            orders=self._orders,
        )

    def epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta`` (0 before any step)."""
        return self.privacy_spent(delta).epsilon

    def would_exceed(
        self,
        noise_multiplier: float,
        sampling_rate: float,
        steps: int,
        epsilon_budget: float,
        delta: float,
    ) -> bool:
        """Whether taking the given steps would push ε above ``epsilon_budget``.

        Call it *before* the step: a run that enforces a budget stops when this is True,
        so the released model never exceeds the budget.

        Raises:
            ValueError: on an invalid argument, including ``epsilon_budget`` ≤ 0.
        """
        budget = float(epsilon_budget)
        if not budget > 0.0:
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        hist = self._extended(check_history_entry(noise_multiplier, sampling_rate, steps))
        eps = compute_epsilon(
            hist,
            delta=delta,
            accountant=self._mechanism,  # type: ignore[arg-type]
            conversion=self._conversion,  # type: ignore[arg-type]
            orders=self._orders,
        ).epsilon
        return eps > budget

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot (for checkpoints)."""
        return {
            "mechanism": self._mechanism,
            "conversion": self._conversion,
            "orders": None if self._orders is None else list(self._orders),
            "history": [[s, q, t] for s, q, t in self.history],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a snapshot taken by ``state_dict`` of an identically built accountant.

        Raises:
            ValueError: naming a missing key, a setting that differs from this
                accountant's (mechanism, conversion, orders), or an invalid history entry. The
                accountant is unchanged when it raises.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"accountant state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        for key in STATE_KEYS:
            if key not in state_dict:
                raise ValueError(f"accountant state_dict is missing the key {key!r}")
        if state_dict["mechanism"] != self._mechanism:
            raise ValueError(
                f"accountant state_dict is for mechanism {state_dict['mechanism']!r}, "
                f"this accountant is {self._mechanism!r}"
            )
        if state_dict["conversion"] != self._conversion:
            raise ValueError(
                f"accountant state_dict uses conversion {state_dict['conversion']!r}, "
                f"this accountant uses {self._conversion!r}"
            )
        orders = state_dict["orders"]
        mine = None if self._orders is None else list(self._orders)
        if (None if orders is None else [float(a) for a in orders]) != mine:
            raise ValueError(
                f"accountant state_dict has orders {orders}, this accountant has {mine}"
            )
        history = state_dict["history"]
        if not isinstance(history, Sequence) or isinstance(history, str):
            raise ValueError(
                f"accountant state_dict 'history' must be a list, got {history!r}"
            )
        entries: list[HistoryEntry] = []
        for i, seg in enumerate(history):
            if not isinstance(seg, Sequence) or len(seg) != 3:
                raise ValueError(
                    f"accountant state_dict history[{i}] must be "
                    f"[noise_multiplier, sampling_rate, steps], got {seg!r}"
                )
            try:
                entries.append(check_history_entry(seg[0], seg[1], seg[2]))
            except (TypeError, ValueError) as err:
                raise ValueError(f"accountant state_dict history[{i}]: {err}") from None
        self.history = entries


def epsilons(accountants: Sequence[Accountant], delta: float) -> np.ndarray:
    """ε of many accountants, computing each distinct history once.

    Per-client sample-level accounting gives thousands of accountants of which most share
    a history (same sampling rate, same participation pattern); grouping by history makes
    the cost proportional to the number of distinct histories.

    Args:
        accountants: the accountants (e.g. one per client).
        delta: δ ∈ (0, 1).

    Returns:
        float64 array, ``out[i] = accountants[i].epsilon(delta)``.
    """
    out = np.empty(len(accountants), dtype=np.float64)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, acc in enumerate(accountants):
        key = (acc.mechanism, acc.conversion, acc.orders, tuple(acc.history))
        groups.setdefault(key, []).append(i)
    for idx in groups.values():
        out[idx] = accountants[idx[0]].epsilon(delta)
    return out


def max_epsilon(accountants: Sequence[Accountant], delta: float) -> float:
    """Largest ε over accountants (the guarantee of per-client sample-level DP)."""
    if not accountants:
        return 0.0
    eps = epsilons(accountants, delta)
    return float(eps.max()) if not np.isnan(eps).any() else math.nan
