"""Federated adversarial training: PGD inner maximisation inside the local step.

Definitions (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018; in the federated setting Zizzo et al., "FAT: Federated Adversarial Training",
NeurIPS-W 2020, and Li et al., "Federated Adversarial Learning: A Framework with Convergence
Analysis", 2022): each client solves min_w E max_{‖δ‖≤ε} ℓ(w; x + δ, y) locally, the inner
max approximated by k steps of projected gradient ascent on the input,

    δ_0 ~ U(ball_ε) (random start) or 0,
    δ_{j+1} = Π_{ball_ε ∩ [lo, hi] − x}( δ_j + α · s(∇_x ℓ(w; x + δ_j, y)) ),

with s = sign for ℓ∞ and s(g) = g / ‖g‖₂ (per example) for ℓ2; Π clips to the ball and
then to the data range [lo, hi] (for ℓ∞ both are coordinate-wise, so the order is exact;
for ℓ2 the range clip after the ball projection keeps ‖δ‖ ≤ ε as clipping towards x only
shrinks δ). The outer step then uses the oracle's gradient at the adversarial batch: the
adversarial wrapper changes only the batch the wrapped oracle sees, so SAM (perturbs w at
the adversarial batch), corrections and the base optimizer compose unchanged.

Defaults: Madry's MNIST setting is ℓ∞, ε = 0.3, α = 0.01, k = 40; that is 40 extra passes
per step, so the scenario block defaults to ε = 0.3, α = 0.1, k = 7 ("PGD-7": α·k/ε ≈ 2.3,
every corner of the cube is reachable from any start); evaluation uses PGD-20 with α = ε/4.

Pitfalls:
- The attack is computed at the current local w with the model in eval mode: no BatchNorm
  statistics move during the k attack passes (norm: batch is refused at validation).
- Per-example directions: the gradient of the *mean* loss w.r.t. x_i is (1/B) ∇ℓ_i; sign
  and per-example ℓ2 normalisation are scale free, so each δ_i depends on (x_i, y_i, w) only.
  That is why it composes with DP-SGD: example i's clipped gradient is a function of
  example i alone (plus data-independent random-start noise), so replacing one example
  changes one clipped term and the sensitivity bound C holds unchanged.
- Random starts draw from the client's generator (the one of (seed, "client", round, id)),
  so serial and Ray runs stay identical; evaluation draws from (seed, "eval", 2).
- ℓ∞ random start is U[−ε, ε]^d; ℓ2 random start is uniform in the ball (direction
  Gaussian-normalised, radius ε·u^{1/d}).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedflat.client.oracle_base import Batch, Oracle, UpdateContext
from fedflat.models.flat import FlatModel

LossOfInput = Callable[[Tensor], Tensor]  # x -> mean loss (differentiable in x)


@dataclass(frozen=True)
class PGD:
    """A projected-gradient attack on the input.

    Attributes:
        epsilon: radius ε of the ball.
        step_size: ascent step α.
        steps: number of ascent steps k.
        norm: "linf" or "l2".
        random_start: start from a uniform point of the ball instead of x.
        clip_min, clip_max: the data range (None = unbounded).
    """

    epsilon: float
    step_size: float
    steps: int
    norm: str = "linf"
    random_start: bool = True
    clip_min: float | None = 0.0
    clip_max: float | None = 1.0


def _per_example_norm(t: Tensor) -> Tensor:
    """‖t_i‖₂ per example, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(delta: Tensor, x: Tensor, attack: PGD) -> Tensor:
    """Π onto the ε-ball, then onto the data range [clip_min, clip_max] − x."""
    eps = attack.epsilon
    if attack.norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        scale = (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
        delta = delta * scale
    if attack.clip_min is not None or attack.clip_max is not None:
        delta = (x + delta).clamp(attack.clip_min, attack.clip_max) - x
    return delta


def random_start(x: Tensor, attack: PGD, gen: torch.Generator) -> Tensor:
    """A uniform draw from the ε-ball (ℓ∞: the cube; ℓ2: the ball), on x's device."""
    eps = attack.epsilon
    if attack.norm == "linf":
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(x)
        return (2 * u - 1) * eps
    d = x[0].numel() if len(x) else 1
    z = torch.randn(x.shape, generator=gen, device=gen.device).to(x)
    r = torch.rand(len(x), generator=gen, device=gen.device).to(x) ** (1.0 / d)
    return z / _per_example_norm(z).clamp_min(1e-12) * (eps * r).view(-1, *([1] * (x.dim() - 1)))


def pgd(loss_of_input: LossOfInput, x: Tensor, attack: PGD, gen: torch.Generator) -> Tensor:
    """The PGD adversarial examples x + δ_k of a batch (detached).

    Args:
        loss_of_input: x -> mean loss of the batch at the fixed model.
        x: the clean inputs [B, ...].
        attack: the attack's parameters.
        gen: generator for the random start.
    """
    if len(x) == 0:
        return x
    x = x.detach()
    delta = torch.zeros_like(x)
    if attack.random_start:
        delta = project(random_start(x, attack, gen), x, attack)
    for _ in range(attack.steps):
        d = delta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_of_input(x + d), d)
        step = g.sign() if attack.norm == "linf" else g / _per_example_norm(g).clamp_min(1e-12)
        delta = project(delta + attack.step_size * step, x, attack)
    return (x + delta).detach()


def model_pgd(model: FlatModel, w: Tensor, x: Tensor, y: Tensor, attack: PGD,
              gen: torch.Generator) -> Tensor:
    """PGD against the flat model at parameters w (eval mode: no statistics move)."""
    was_training = model.module.training
    model.module.eval()
    w = w.detach()
    try:
        return pgd(lambda xa: model.functional_loss(w, xa, y), x, attack, gen)
    finally:
        model.module.train(was_training)


def adversarial_oracle(inner: Oracle, attack: PGD) -> Oracle:
    """Wrap an oracle so that it sees the PGD adversarial version of each mini-batch.

    The reported loss is the inner oracle's loss at the adversarial batch (the robust
    training loss).
    """

    def grad(w: Tensor, batch: Batch, state: Any, gen: torch.Generator, ctx: UpdateContext):
        x, y = batch
        x_adv = model_pgd(ctx.model, w, x, y, attack, gen)
        loss, g, state, m = inner.grad(w, (x_adv, y), state, gen, ctx)
        return loss, g, state, m

    return Oracle(init=inner.init, grad=grad, passes=inner.passes + attack.steps,
                  finish=inner.finish)


def robust_accuracy(model: FlatModel, w: Tensor, x: Tensor, y: Tensor, attack: PGD,
                    gen: torch.Generator, batch_size: int = 1000) -> float:
    """Accuracy of the model at w on PGD examples of (x, y)."""
    correct = 0.0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        xa = model_pgd(model, w, xb, yb, attack, gen)
        _, cor, _ = model.evaluate(w, xa, yb)
        correct += cor
    return correct / max(len(y), 1)
