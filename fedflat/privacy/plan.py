"""A run's privacy plan: calibrated noise, per-client and per-round accounting, budgets.

The driver resolves the plan once (calibrating σ from a target ε when the scenario gives
one; calibrations are cached), hands workers a scenario whose noise multipliers are filled
in, and keeps the accountants: one per client for sample-level DP (ε over the client's own
participations) and one for user-level DP (per round). Before each round it asks whether
a step would exceed a budget: a client that would is left out; a round that would exceed
the user-level budget is not run, and the run stops with status ``budget_exhausted``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from fedflat.client.update import LocalSchedule
from fedflat.privacy.accountant import Accountant, epsilons
from fedflat.privacy.accounting import noise_multiplier as calibrate
from fedflat.privacy.client_noise import accounted_noise_multiplier
from fedflat.privacy.diff2 import release_sigmas, round_sigma
from fedflat.scenario.schema import Scenario


def expected_cohort(sc: Scenario, num_clients: int) -> float:
    s = sc.server
    if s.sampling == "poisson":
        q = s.sampling_rate if s.sampling_rate is not None else s.clients_per_round / num_clients
        return q * num_clients
    return float(s.clients_per_round)


def user_sampling_rate(sc: Scenario, num_clients: int) -> float:
    return expected_cohort(sc, num_clients) / num_clients


@dataclass
class PrivacyPlan:
    """Resolved noise multipliers and the run's accountants."""

    scenario: Scenario  # with noise multipliers filled in (what workers build from)
    sample_sigma: float | None = None  # σ of each release in DP-SGD
    sample_sigma_accounted: float | None = None  # σ per step for the accountant (DP-SAM: σ/√2)
    user_sigma: float | None = None  # z (or DP-FedSAM's σ) the mechanism applies
    user_sigma_accounted: float | None = None  # per round for the accountant (per_tensor: σ/√K)
    user_q: float = 0.0
    diff2_sigmas: tuple[float, float] | None = None  # DIFF2: (σ1, σ2), one release per round
    clients: dict[int, Accountant] = field(default_factory=dict)
    user: Accountant | None = None
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- budgets
    @property
    def sample(self) -> Any:
        return self.scenario.privacy.sample_level

    @property
    def user_cfg(self) -> Any:
        return self.scenario.privacy.user_level

    def _acc(self) -> Accountant:
        p = self.scenario.privacy
        return Accountant(accountant=p.accountant, conversion=p.conversion)

    def _sample_sigma(self, round_: int | None) -> float | None:
        """σ the accountant records for round ``round_`` (DIFF2: full or difference)."""
        if self.diff2_sigmas is None:
            return self.sample_sigma_accounted
        if round_ is None:
            raise ValueError("DIFF2's ledger needs the round of each release")
        return round_sigma(round_, self.diff2_sigmas, self.sample.diff2.period)

    def client_allowed(self, client_id: int, q: float, steps: int,
                       round_: int | None = None) -> bool:
        """Whether a client's next participation (``steps`` steps at rate q) fits its budget."""
        if not self.sample.enabled or self.sample.epsilon is None:
            return True
        acc = self.clients.get(client_id) or self._acc()
        return not acc.would_exceed(self._sample_sigma(round_), q, steps,
                                    self.sample.epsilon, self.sample.delta)

    def record_client(self, client_id: int, q: float, steps: int,
                      round_: int | None = None) -> None:
        if self.sample.enabled and steps > 0:
            acc = self.clients.setdefault(client_id, self._acc())
            acc.step(self._sample_sigma(round_), q, steps)

    def round_allowed(self) -> bool:
        if not self.user_cfg.enabled or self.user_cfg.epsilon is None:
            return True
        assert self.user is not None  # noqa: S101 - built with the plan
        return not self.user.would_exceed(self.user_sigma_accounted, self.user_q, 1,
                                          self.user_cfg.epsilon, self.user_cfg.delta)

    def record_round(self) -> None:
        if self.user is not None:
            self.user.step(self.user_sigma_accounted, self.user_q, 1)

    # ---------------------------------------------------------------- reporting
    def metrics(self, num_clients: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.user is not None:
            out["epsilon_user"] = self.user.epsilon(self.user_cfg.delta)
        if self.sample.enabled:
            eps = self.client_epsilons(num_clients)
            out["epsilon_sample_max"] = float(eps.max())
            out["epsilon_sample_median"] = float(np.median(eps))
        return out

    def client_epsilons(self, num_clients: int) -> np.ndarray:
        eps = np.zeros(num_clients)
        ids = sorted(self.clients)
        if ids:
            eps[ids] = epsilons([self.clients[i] for i in ids], self.sample.delta)
        return eps

    def summary(self, num_clients: int) -> dict[str, Any]:
        return {
            "accountant": self.scenario.privacy.accountant,
            "sample_level": None if not self.sample.enabled else {
                "mechanism": self.sample.mechanism, "noise_multiplier": self.sample_sigma,
                "accounted_noise_multiplier": self.sample_sigma_accounted,
                **({} if self.diff2_sigmas is None else {
                    "diff2_noise_multipliers": {"full": self.diff2_sigmas[0],
                                                "difference": self.diff2_sigmas[1]}}),
                "epsilon_budget": self.sample.epsilon, "delta": self.sample.delta,
                "epsilon_per_client": self.client_epsilons(num_clients).tolist()},
            "user_level": None if self.user is None else {
                "noise_multiplier": self.user_sigma,
                "accounted_noise_multiplier": self.user_sigma_accounted,
                "sampling_rate": self.user_q,
                "rounds_accounted": self.user.total_steps,
                "epsilon": self.user.epsilon(self.user_cfg.delta),
                "epsilon_budget": self.user_cfg.epsilon, "delta": self.user_cfg.delta},
            "notes": self.notes,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {c: a.state_dict() for c, a in self.clients.items()},
                "user": self.user.state_dict() if self.user is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clients = {}
        for c, st in state["clients"].items():
            acc = self._acc()
            acc.load_state_dict(st)
            self.clients[int(c)] = acc
        if state.get("user") is not None and self.user is not None:
            self.user.load_state_dict(state["user"])


def resolve_privacy(sc: Scenario, client_sizes: np.ndarray, schedule: LocalSchedule, *,
                    num_tensors: int) -> PrivacyPlan:
    """Calibrate σ where the scenario gives a target ε and build the accountants.

    Sample level: the worst client is the one with the largest sampling rate q = L/n (for a
    fixed number of epochs q·T is the same for every client, and ε grows with q at fixed
    q·T); it is assumed to take part in the ``participation_quantile`` of the binomial
    number of participations. User level: q = expected clients per round / N, T = rounds;
    with DP-FedSAM's ``clip_scope: per_tensor`` the K = ``num_tensors`` parameter tensors are
    each clipped to C, so the sensitivity is C√K and the accountant records σ/√K (a target ε
    is met by calibrating σ/√K and applying σ).

    Args:
        sc: the scenario.
        client_sizes: [N] training samples per client.
        schedule: the local schedule (sample-level steps and rates).
        num_tensors: K, the model's parameter tensors (``len(FlatModel.segments)``).
    """
    p = sc.privacy
    plan = PrivacyPlan(scenario=sc)
    n_clients = len(client_sizes)
    updates: dict[str, Any] = {}
    if p.sample_level.enabled:
        s = p.sample_level
        per_step = 2 if s.mechanism == "dp_sam" else 1
        sigma = s.noise_multiplier
        if sigma is None:
            n_min = int(client_sizes.min())
            q = schedule.rate(n_min)
            steps = schedule.num_steps(n_min)
            rate = expected_cohort(sc, n_clients) / n_clients
            parts = int(stats.binom.ppf(s.participation_quantile, sc.server.rounds, min(1.0, rate)))
            parts = max(parts, 1)
            acc_sigma = calibrate(sampling_rate=q, steps=steps * parts, epsilon=s.epsilon,
                                  delta=s.delta, accountant=p.accountant, conversion=p.conversion)
            sigma = acc_sigma * math.sqrt(per_step)
            plan.notes.append(
                f"sample-level σ={sigma:.4f} calibrated for ε={s.epsilon}, δ={s.delta} on the "
                f"smallest client (n={n_min}, q={q:.4f}, {steps} steps × {parts} participations)")
        plan.sample_sigma = float(sigma)
        plan.sample_sigma_accounted = float(sigma) / math.sqrt(per_step)
        if s.mechanism == "diff2":  # σ is DP-GD's over the rounds; the releases split it
            d = s.diff2
            plan.diff2_sigmas = release_sigmas(float(sigma), sc.server.rounds, d.period,
                                               d.sigma_split)
            plan.notes.append(
                f"diff2: σ1={plan.diff2_sigmas[0]:.4f} on full releases (every {d.period} "
                f"rounds, clip C1={s.clip_norm}), σ2={plan.diff2_sigmas[1]:.4f} on difference "
                f"releases (clip C2={d.clip_diff}), sigma_split {d.sigma_split}: the ledger "
                f"of {sc.server.rounds} full-batch releases at σ={sigma:.4f}")
        updates["sample_level"] = s.model_copy(update={"noise_multiplier": float(sigma)})
    if p.user_level.enabled:
        u = p.user_level
        plan.user_q = user_sampling_rate(sc, n_clients)
        # Applied / accounted: 1 unless per-tensor clipping widens the sensitivity to C√K.
        scope = u.clip_scope if u.noise_placement == "client" else "global"
        ratio = 1.0 / accounted_noise_multiplier(1.0, clip_scope=scope, num_tensors=num_tensors)
        z = u.noise_multiplier
        if z is None:
            z_acc = calibrate(sampling_rate=plan.user_q, steps=sc.server.rounds,
                              epsilon=u.epsilon, delta=u.delta, accountant=p.accountant,
                              conversion=p.conversion)
            z = z_acc * ratio
            plan.notes.append(f"user-level z={z:.4f} calibrated for ε={u.epsilon}, δ={u.delta}, "
                              f"q={plan.user_q:.4f}, T={sc.server.rounds} rounds")
        plan.user_sigma = float(z)
        plan.user_sigma_accounted = float(z) / ratio
        if ratio != 1.0:
            plan.notes.append(
                f"user-level clip_scope per_tensor: {num_tensors} tensors each clipped to C give "
                f"sensitivity C·√{num_tensors}; accounted noise multiplier "
                f"σ/√{num_tensors} = {plan.user_sigma_accounted:.4f} (applied σ = {z:.4f})")
        plan.user = plan._acc()
        updates["user_level"] = u.model_copy(update={"noise_multiplier": float(z)})
    if updates:
        plan.scenario = sc.model_copy(update={"privacy": p.model_copy(update=updates)})
    return plan
