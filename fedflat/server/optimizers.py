"""Server optimizers that need no adaptive state: FedAvg (server lr) and FedAvgM.

Both treat the aggregate Δ̄ as a negative pseudo-gradient (ALGORITHMS.md §3.5).
Adaptive ones (FedAdam, FedYogi, FedAdagrad) live in ``fedflat.server.fedopt``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedflat.server.pipeline import ServerRound, ServerStep


def _need_aggregate(rnd: ServerRound) -> torch.Tensor:
    if rnd.aggregate is None:
        raise ValueError("server optimizer step before any aggregation rule")
    return rnd.aggregate


def fedavg(*, lr: float = 1.0) -> ServerStep:
    """x ← x + η_g Δ̄ (McMahan et al. 2017 with a server learning rate)."""
    if lr <= 0:
        raise ValueError(f"server lr must be > 0, got {lr}")

    def apply(rnd: ServerRound, state: Any, gen: torch.Generator):
        agg = _need_aggregate(rnd)
        return rnd.with_(new_params=rnd.params.add(agg, alpha=lr)), state, {}

    return ServerStep("fedavg", init=lambda p: (), apply=apply)


def fedavgm(*, lr: float = 1.0, momentum: float = 0.9) -> ServerStep:
    """v ← βv + Δ̄; x ← x + η_g v (Hsu et al. 2019)."""
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"fedavgm needs lr > 0 and momentum in [0, 1); got {lr}, {momentum}")

    def apply(rnd: ServerRound, v: torch.Tensor, gen: torch.Generator):
        agg = _need_aggregate(rnd)
        v = v.mul(momentum).add_(agg)
        return rnd.with_(new_params=rnd.params.add(v, alpha=lr)), v, {}

    return ServerStep("fedavgm", init=torch.zeros_like, apply=apply)
