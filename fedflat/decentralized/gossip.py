"""Gossip averaging and CHOCO-Gossip over stacked node parameters (pure functions).

The nodes' models are the rows of ``X`` ([n, d]); the mixing matrix ``W`` ([n, n]) is
symmetric doubly stochastic (``fedflat.decentralized.topology``).

D-SGD with local steps (Lian et al. 2017; Koloskova et al. 2020, local updates): in each
round every node runs its local update (the ordinary ``client_update``: K steps of its
oracle, SGD / SAM family / DP-SGD) from its own model, ``x_i^{t+½} = x_i^t + Δ_i``, then
``gossip_steps`` times ``X ← W X``. With W = 11ᵀ/n one gossip step is exact averaging, so
D-SGD on the complete graph is FedAvg with every client and uniform weights.

CHOCO-Gossip / CHOCO-SGD (Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization
and Gossip Algorithms with Compressed Communication", ICML 2019, Algorithms 1 and 2):
every node i keeps a public copy x̂_i, known to itself and its neighbours (all start at 0).
One gossip step is

    q_i   = Q(x_i − x̂_i)                        (compressed; sent to every neighbour)
    x̂_j  ← x̂_j + q_j                            (for i and all its neighbours j)
    x_i   ← x_i + γ Σ_j w_ij (x̂_j − x̂_i)        (consensus step size γ ∈ (0, 1])

so in matrix form ``X̂ ← X̂ + Q``, ``X ← X + γ (W − I) X̂``. Facts the tests check: with the
identity codec (fp32) and γ = 1, x̂_i = x_i after the exchange and the step is ``X ← W X``;
for any codec the node average x̄ is preserved exactly (1ᵀ(W − I) = 0).

Pitfalls: the convergence proof needs a *contractive* compressor, E‖Q(v) − v‖² ≤ (1 − ω)‖v‖²
with ω > 0: top_k, sign and random_k *without* the d/k rescaling are; random_k with
``unbiased: true`` and qsgd are unbiased but not contractive for few kept coordinates /
levels (their variance exceeds ‖v‖²) and may diverge; the paper scales them down (Q/τ).
γ must shrink with ω and the spectral gap (the paper's Theorem 2 gives a
sufficient γ, far below 1 for strong compression; its experiments tune γ, small for
top-1 %). γ = 1 with a lossy codec is usually unstable. No error feedback is needed: x̂ is
CHOCO's own memory of what was not sent yet.

Bytes: a node sends one message per neighbour per gossip step (plain gossip: its fp32
model, ``fp32_nbytes``; CHOCO: the codec's exact ``nbytes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fedflat.comm.codecs import Codec, fp32_nbytes


def consensus_distance(x: Tensor) -> float:
    """(1/n) Σ_i ‖x_i − x̄‖² of the rows of ``x`` (accumulated in float64)."""
    x64 = x.to(torch.float64)
    return float((x64 - x64.mean(dim=0)).square().sum() / x64.shape[0])


def gossip_step(x: Tensor, w: Tensor) -> Tensor:
    """One plain gossip (averaging) step ``X ← W X``."""
    return w.to(x.dtype) @ x


class ChocoStep(NamedTuple):
    """One CHOCO-Gossip step's result: new models, new public copies, bytes per node."""

    x: Tensor
    x_hat: Tensor
    message_nbytes: list[int]


def choco_step(x: Tensor, x_hat: Tensor, w: Tensor, codec: Codec, gamma: float,
               gens: Sequence[torch.Generator]) -> ChocoStep:
    """One CHOCO-Gossip step (see the module docstring).

    Args:
        x: [n, d] node models.
        x_hat: [n, d] public copies x̂ (zeros before the first step).
        w: [n, n] mixing matrix.
        codec: the compressor Q (a plain codec; CHOCO has its own memory x̂).
        gamma: consensus step size γ.
        gens: one generator per node for stochastic codecs.
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"CHOCO needs 0 < gamma <= 1, got {gamma}")
    q = torch.empty_like(x)
    nbytes = []
    for i, gen in enumerate(gens):
        enc = codec.encode(x[i] - x_hat[i], gen)
        q[i] = codec.decode(enc)
        nbytes.append(enc.nbytes)
    x_hat = x_hat + q
    wt = w.to(x.dtype)
    return ChocoStep(x + gamma * (wt @ x_hat - x_hat), x_hat, nbytes)


def plain_message_nbytes(x: Tensor) -> list[int]:
    """Bytes of each node's message in plain gossip (its model, fp32 with one header)."""
    return [fp32_nbytes(row) for row in x]
