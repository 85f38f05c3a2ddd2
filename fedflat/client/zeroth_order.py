"""Zeroth-order clients: two-point random-direction gradient estimators, seed uplink.

Definitions (Nesterov & Spokoiny, "Random Gradient-Free Minimization of Convex Functions",
FoCM 2017; Flaxman et al., SODA 2005 for the sphere; federated: Fang et al., "Communication-
Efficient Stochastic Zeroth-Order Optimization for Federated Learning", IEEE TSP 2022, and
the seed trick of Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models
with Communication Cost under 18 Kilobytes" (FedKSeed), ICML 2024). For a mini-batch loss f
and smoothing μ > 0, with q i.i.d. directions u_j per local step:

    c_j = (f(w + μ u_j) − f(w)) / μ                          (two-point forward difference)
    gaussian: u_j ~ N(0, I_d),          ĝ = (1/q) Σ_j c_j u_j
    sphere:   u_j ~ U(unit sphere S^{d−1}), ĝ = (d/q) Σ_j c_j u_j

ĝ is unbiased for the gradient of the smoothed loss, f_μ(w) = E_{v ~ N(0,I)} f(w + μv)
(Gaussian) or E_{v ~ U(unit ball)} f(w + μv) (sphere); E[f(w)·u] = 0 removes the base point.
For a quadratic f = ½‖w‖² + bᵀw (gradient g) one direction gives, exactly,
    gaussian: E‖ĝ − g‖² = (d + 1)‖g‖² + μ² d(d + 2)(d + 4) / 4,
    sphere:   E‖ĝ − g‖² = (d − 1)‖g‖² + μ² d² / 4,
and q directions divide both by q (tests/test_zo.py derives and checks them).

Queries: one step costs q + 1 loss evaluations (f(w) once, shared); the client's total per
round is logged as ``client/zo_queries`` (summed over steps, averaged over clients).

Seed uplink (``uplink: seeds``): each step draws one 63-bit seed from the client's generator;
the q directions of that step are regenerated from it. The client sends, per step, the seed
(8 bytes) and its q scalars c_j (fp32, 4 bytes each) plus one 4-byte header, instead of 4d
bytes of delta. The server replays the local optimizer from the global model it broadcast,
with ĝ rebuilt by the same function the client used (``estimate``), so its delta equals the
client's bit for bit (checked at every round). This needs the delta to be a function of
(global model, ĝ_1..ĝ_K, lr) only: plain local optimizer, no corrections, no gradient clip,
no uplink codec or DP; the scenario checks refuse the rest, naming the key.

Pitfalls: the directions are drawn in float32 on the client's generator device, so seed
mode needs the server to rebuild them on the same device type (CPU here); μ too small makes
c_j cancel catastrophically in float32 (μ = 1e-3 default is safe for losses of order 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedflat.client.oracle_base import Batch, Oracle, UpdateContext
from fedflat.comm.codecs import HEADER_NBYTES

SEED_BYTES = 8  # one int64 per local step
SCALAR_BYTES = 4  # one fp32 per direction


@dataclass
class ZOState:
    """What a zeroth-order client accumulates over one update: its uplink message."""

    seeds: list[int] = field(default_factory=list)
    scalars: list[Tensor] = field(default_factory=list)
    queries: int = 0

    def message(self) -> dict[str, Tensor]:
        q = self.scalars[0].numel() if self.scalars else 0
        return {"zo_seeds": torch.tensor(self.seeds, dtype=torch.int64),
                "zo_scalars": (torch.stack(self.scalars) if self.scalars
                               else torch.zeros(0, q))}


def message_nbytes(seeds: Tensor, scalars: Tensor) -> int:
    """Exact bytes of a seed message: header + 8 per seed + 4 per scalar."""
    return HEADER_NBYTES + SEED_BYTES * seeds.numel() + SCALAR_BYTES * scalars.numel()


def directions(seed: int, q: int, d: int, kind: str) -> Tensor:
    """The q directions [q, d] of one step, regenerated from its seed (CPU, float32)."""
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.randn(q, d, generator=gen)
    if kind == "sphere":
        u = u / u.norm(dim=1, keepdim=True)
    return u


def estimate(u: Tensor, c: Tensor, kind: str) -> Tensor:
    """ĝ from directions u [q, d] and scalars c [q] (the one formula client and server use)."""
    scale = (u.shape[1] if kind == "sphere" else 1.0) / u.shape[0]
    return (c.to(u.dtype) @ u) * scale


def zo_gradient(loss: Callable[[Tensor], Tensor], w: Tensor, seed: int, q: int, mu: float,
                kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(f(w), ĝ, scalars c) of one step; ``loss`` maps a flat vector to the batch loss."""
    u = directions(seed, q, w.numel(), kind).to(w.device)
    f0 = loss(w)
    c = torch.stack([(loss(w + mu * u[j]) - f0) / mu for j in range(q)]).float()
    return f0, estimate(u, c.to(u.device), kind), c.cpu()


def zo_oracle(q: int, mu: float, kind: str) -> Oracle:
    """The zeroth-order oracle: loss evaluations only (no backward pass)."""

    def grad(w: Tensor, batch: Batch, state: ZOState, gen: torch.Generator,
             ctx: UpdateContext):
        x, y = batch
        seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        if len(y) == 0:
            g = torch.zeros_like(w)
            c = torch.zeros(q)
            f0 = torch.tensor(float("nan"))
        else:
            with torch.no_grad():
                f0, g, c = zo_gradient(lambda v: ctx.model.functional_loss(v, x, y), w, seed,
                                       q, mu, kind)
            state.queries += q + 1
        state.seeds.append(seed)
        state.scalars.append(c)
        return f0, g.to(w), state, {}

    return Oracle(init=lambda ctx: ZOState(), grad=grad, passes=q + 1)


def replay(x_global: Tensor, seeds: Tensor, scalars: Tensor, lr: float, kind: str,
           optimizer: Any) -> Tensor:
    """The server's reconstruction of a client's delta from its seed message: the client's
    local optimizer re-run from ``x_global`` with ĝ_k = estimate(directions(seed_k), c_k)."""
    w = x_global.clone()
    state = optimizer.init(w)
    for seed, c in zip(seeds.tolist(), scalars, strict=True):
        u = directions(seed, c.numel(), w.numel(), kind).to(w.device)
        w, state = optimizer.step(w, estimate(u, c.to(u.device), kind).to(w), state, lr)
    return w - x_global
