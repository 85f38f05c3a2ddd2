"""Server halves of the client-drift corrections (SCAFFOLD, FedDyn, FedSMOO, momentum).

Each factory returns a ``ServerStep``. Where they go in the pipeline
(clip → rule → central noise → optimizer → *these* → SWA):

* ``feddyn_server``: right **after** the optimizer step (FedAvg with ``server_lr = 1``);
  it replaces ``new_params`` by ``new_params − h/α`` (= ``mean(y_i) − h/α``).
* ``scaffold_server``: after the rule; with ``server_lr=None`` (default) it only updates
  and broadcasts ``c`` and the optimizer step (FedAvg) moves the model; with a float
  ``server_lr`` it is the optimizer step itself (``x + η_g Δ̄``): then leave FedAvg out.
* ``fedsmoo_server``: after the rule (reads the ``fedsmoo_mu`` extras only).
* ``prev_update_broadcast``: **last** among the steps that change ``new_params`` (after
  the optimizer and ``feddyn_server``), since it broadcasts ``new_params − params``.

Broadcast vectors are put in ``round.broadcast`` for the *next* round's clients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedflat.client.local_corrections import (
    MOFEDSAM_STEPS_LR,
    PREV_GLOBAL_UPDATE,
    PREV_STEPS_LR,
    SCAFFOLD_C,
    SCAFFOLD_DC,
)
from fedflat.client.oracles import FEDSMOO_MU, FEDSMOO_S
from fedflat.server.pipeline import Metrics, ServerRound, ServerStep


def _population(rnd: ServerRound, num_clients: int | None, who: str) -> int:
    n = num_clients if num_clients is not None else rnd.num_clients
    if n < 1:
        raise ValueError(f"{who} num_clients must be >= 1, got {n}")
    if n < len(rnd.client_ids):
        raise ValueError(
            f"{who} num_clients={n} is smaller than the {len(rnd.client_ids)} clients "
            "that took part this round"
        )
    return n


def _extra(rnd: ServerRound, key: str, who: str, producer: str) -> Tensor | None:
    """The stacked extra ``key`` (None if nobody took part); raise if it is missing."""
    x = rnd.extras.get(key)
    if x is None and rnd.deltas.shape[0] > 0:
        raise ValueError(
            f"{who} needs the uplink extra {key!r}; the clients must run the "
            f"{producer} correction"
        )
    return x


def scaffold_server(
    *, num_clients: int | None = None, server_lr: float | None = None
) -> ServerStep:
    """SCAFFOLD server: ``c ← c + (1/N) Σ_{S_t} Δc_i``, broadcast as ``"scaffold_c"``.

    Args:
        num_clients: N, the *total* number of clients; None = ``round.num_clients``.
        server_lr: None to leave the model step to the optimizer (FedAvg); a float η_g
            to also set ``new_params = params + η_g · aggregate`` (this step is then the
            optimizer; do not chain FedAvg as well).

    Returns:
        ``ServerStep`` named ``scaffold``; state = c (flat tensor, initially 0).

    References:
        Karimireddy et al., SCAFFOLD, ICML 2020, https://arxiv.org/abs/1910.06378
        (ALGORITHMS.md §3.3).
    """
    if num_clients is not None and num_clients < 1:
        raise ValueError(f"scaffold_server num_clients must be >= 1, got {num_clients}")
    if server_lr is not None and not server_lr > 0:
        raise ValueError(f"scaffold_server server_lr must be > 0, got {server_lr}")

    def apply(
        rnd: ServerRound, c: Tensor, gen: torch.Generator
    ) -> tuple[ServerRound, Tensor, Metrics]:
        n = _population(rnd, num_clients, "scaffold_server")
        dc = _extra(rnd, SCAFFOLD_DC, "scaffold_server", "scaffold()")
        if dc is not None and dc.shape[0] > 0:
            c = c + dc.to(c).sum(0) / n
        changes: dict[str, Any] = {"broadcast": {**rnd.broadcast, SCAFFOLD_C: c}}
        if server_lr is not None:
            if rnd.aggregate is None:
                raise ValueError(
                    "scaffold_server with server_lr needs an aggregate (put it after "
                    "the rule)"
                )
            changes["new_params"] = rnd.params + server_lr * rnd.aggregate
        return rnd.with_(**changes), c, {"scaffold_c_norm": float(c.norm())}

    return ServerStep(name="scaffold", init=torch.zeros_like, apply=apply)


def feddyn_server(*, alpha: float, num_clients: int | None = None) -> ServerStep:
    """FedDyn server: ``h ← h − (α/N) Σ_{S_t} Δ_i``; ``x ← mean(y_i) − h/α``.

    ``mean(y_i)`` is taken as ``round.new_params`` (the optimizer step ran before:
    FedAvg with ``server_lr = 1`` gives ``x + Δ̄``), or ``params + aggregate`` when no
    optimizer ran. The mean's weights are the rule's (the paper: uniform over S_t).

    Args:
        alpha: α > 0, the same as the clients' ``feddyn(alpha=...)``.
        num_clients: N; None = ``round.num_clients``.

    Returns:
        ``ServerStep`` named ``feddyn``; state = h (flat tensor, initially 0).

    References:
        Acar et al., Federated Learning Based on Dynamic Regularization, ICLR 2021,
        https://arxiv.org/abs/2111.04263 (ALGORITHMS.md §3.4).
    """
    if not alpha > 0:
        raise ValueError(f"feddyn_server alpha must be > 0, got {alpha}")
    if num_clients is not None and num_clients < 1:
        raise ValueError(f"feddyn_server num_clients must be >= 1, got {num_clients}")

    def apply(
        rnd: ServerRound, h: Tensor, gen: torch.Generator
    ) -> tuple[ServerRound, Tensor, Metrics]:
        n = _population(rnd, num_clients, "feddyn_server")
        if rnd.deltas.shape[0] > 0:
            h = h - (alpha / n) * rnd.deltas.to(h).sum(0)
        if rnd.new_params is not None:
            base = rnd.new_params
        elif rnd.aggregate is not None:
            base = rnd.params + rnd.aggregate
        else:
            raise ValueError(
                "feddyn_server needs an aggregate or new_params (put it after the rule)"
            )
        metrics = {"feddyn_h_norm": float(h.norm())}
        return rnd.with_(new_params=base - h / alpha), h, metrics

    return ServerStep(name="feddyn", init=torch.zeros_like, apply=apply)


def fedsmoo_server(*, rho: float, eps: float = 1e-7) -> ServerStep:
    """FedSMOO server: ``s = ρ · mean(μ_i) / ‖mean(μ_i)‖`` over S_t, broadcast.

    ``s`` goes to the clients as ``round.broadcast["fedsmoo_s"]``.

    This is the simplified s-update of the reference code (it drops the ŝ_{i,K} term).
    The model update is FedDyn's: chain ``feddyn_server`` as well.

    Args:
        rho: ρ ≥ 0, the same as the clients' ``fedsmoo(rho=...)``.
        eps: added to the norm (reference: 1e-7).

    Returns:
        ``ServerStep`` named ``fedsmoo``; state = s.

    References:
        Sun et al., ICML 2023, https://arxiv.org/abs/2305.11584; code woodenchild95/
        FL-Simulator server/FedSMOO.py (ALGORITHMS.md §3.8).
    """
    if rho < 0:
        raise ValueError(f"fedsmoo_server rho must be >= 0, got {rho}")
    if eps < 0:
        raise ValueError(f"fedsmoo_server eps must be >= 0, got {eps}")

    def apply(
        rnd: ServerRound, s: Tensor, gen: torch.Generator
    ) -> tuple[ServerRound, Tensor, Metrics]:
        mu = _extra(rnd, FEDSMOO_MU, "fedsmoo_server", "fedsmoo()")
        if mu is not None and mu.shape[0] > 0:
            mean = mu.to(s).mean(0)
            denom = float(mean.norm()) + eps
            s = mean * (rho / denom) if rho > 0 and denom > 0 else torch.zeros_like(s)
        return rnd.with_(broadcast={**rnd.broadcast, FEDSMOO_S: s}), s, {}

    return ServerStep(name="fedsmoo", init=torch.zeros_like, apply=apply)


def prev_update_broadcast() -> ServerStep:
    """Broadcast this round's global update ``new_params − params``.

    The key is ``"prev_global_update"``.

    Used by FedLESAM (perturbation direction) and MoFedSAM (client momentum). When the
    clients uplink ``mofedsam_steps_lr`` (the mofedsam correction), the mean over the
    participants is also broadcast as ``prev_steps_lr`` (shape [1]).

    Returns:
        ``ServerStep`` named ``prev_update``; stateless.
    """

    def apply(
        rnd: ServerRound, state: Any, gen: torch.Generator
    ) -> tuple[ServerRound, Any, Metrics]:
        if rnd.new_params is None:
            raise ValueError(
                "prev_update_broadcast needs new_params: put it after the optimizer "
                "step"
            )
        out = {**rnd.broadcast, PREV_GLOBAL_UPDATE: rnd.new_params - rnd.params}
        kl = rnd.extras.get(MOFEDSAM_STEPS_LR)
        if kl is not None and kl.shape[0] > 0:
            out[PREV_STEPS_LR] = kl.reshape(kl.shape[0], -1)[:, 0].mean().reshape(1)
        return rnd.with_(broadcast=out), state, {}

    return ServerStep(name="prev_update", init=lambda params: (), apply=apply)
