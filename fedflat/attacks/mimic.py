"""Mimic: the Byzantine clients copy one honest client (Karimireddy, He, Jaggi 2022).

The target follows the heuristic of the authors' code (epfml/byzantine-robust-noniid-
optimizer ``codes/attacks/mimic.py``, ``MimicVariantAttacker``): a direction z that
tracks the top principal direction of the honest deltas is learned during a warm-up,
and the target is the honest client whose delta has the largest inner product with z,
i.e. the one that most increases the heterogeneity the rule sees along that direction.

Round t of the warm-up (t = 0, 1, ..., warmup - 1), with honest rows h_1..h_m:

* t = 0: mu = mean(h); z_0 ~ N(0, I_d) from the 'attack' stream; z = sum_i ((h_i - mu)
  . z_0) (h_i - mu), normalised (one power step on the honest covariance).
* t > 0: mu <- t/(t+1) mu + mean(h)/(t+1); c = sum_i ((h_i - mu) . z)(h_i - mu);
  z <- t/(t+1) z + c / ||c|| / (t+1), normalised.
* target = the honest client of largest h_i . z.

After the warm-up the target client is fixed (as in the code). When it is not among
the round's honest participants (client sampling, which the code does not have), that
round copies the honest participant of largest h_i . z; the fixed target stays.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MimicState = dict[str, Any]


def mimic_init() -> MimicState:
    """The state before the first round: no direction learned, no target."""
    return {"t": 0, "mu": None, "z": None, "target": -1}


def _power_step(h: Tensor, mu: Tensor, z: Tensor) -> Tensor:
    dev = h.to(torch.float64) - mu
    return dev.T @ (dev @ z)  # sum_i ((h_i - mu) . z) (h_i - mu), without a loop


def _unit(v: Tensor) -> Tensor:
    norm = float(torch.linalg.vector_norm(v))
    return v / norm if norm > 0 else v


def mimic_target(
    honest: Tensor,
    honest_ids: list[int],
    state: MimicState,
    *,
    warmup: int,
    gen: torch.Generator,
) -> tuple[int, MimicState]:
    """Update the heuristic with this round's honest rows; return the row to copy.

    Args:
        honest: [m, d] finite honest deltas of the round (m >= 1).
        honest_ids: their client ids.
        state: ``mimic_init()`` or the state returned by the previous round.
        warmup: rounds of learning z (>= 1).
        gen: generator of z_0 (used at t = 0 only).

    Returns:
        (index into ``honest`` of the client to copy, new state).
    """
    h64 = honest.to(torch.float64)
    avg = h64.mean(dim=0)
    t = int(state["t"])
    new = dict(state)
    if t == 0:
        z0 = torch.randn(honest.shape[1], generator=gen, dtype=torch.float64,
                         device=gen.device).to(honest.device)
        new["mu"] = avg
        z = _power_step(h64, avg, _unit(z0))
        new["z"] = _unit(z) if float(torch.linalg.vector_norm(z)) > 0 else _unit(z0)
    elif t < warmup:
        mu = t / (t + 1) * state["mu"] + avg / (t + 1)
        new["mu"] = mu
        new["z"] = _unit(t / (t + 1) * state["z"] + _unit(_power_step(h64, mu, state["z"]))
                         / (t + 1))
    scores = h64 @ new["z"]
    best = int(torch.argmax(scores))
    if t < warmup:
        new["target"] = int(honest_ids[best])
        row = best
    else:
        target = int(state["target"])
        row = honest_ids.index(target) if target in honest_ids else best
    new["t"] = t + 1
    return row, new


__all__ = ["MimicState", "mimic_init", "mimic_target"]
