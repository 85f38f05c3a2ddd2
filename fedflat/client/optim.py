"""Base optimizers of the local step, on flat vectors (PyTorch semantics, ALGORITHMS.md §1.1).

The client state of these optimizers is re-created at every round, as in every FL code base
read for the spec (a fresh ``torch.optim.SGD`` per client per round).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class LocalOptimizer(NamedTuple):
    """init(w) -> state; step(w, g, state, lr) -> (w_new, state). ``w`` may be updated in place."""

    init: Callable[[Tensor], Any]
    step: Callable[[Tensor, Tensor, Any, float], tuple[Tensor, Any]]


def sgd(
    *, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
    dampening: float = 0.0,
) -> LocalOptimizer:
    """SGD with coupled weight decay and heavy-ball/Nesterov momentum, as ``torch.optim.SGD``."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum == 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening = 0")

    def step(w: Tensor, g: Tensor, buf: Tensor | None, lr: float):
        d = g.add(w, alpha=weight_decay) if weight_decay else g
        if momentum:
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(momentum).add_(d, alpha=1.0 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        return w.add_(d, alpha=-lr), buf

    return LocalOptimizer(init=lambda w: None, step=step)


def adam(
    *, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
) -> LocalOptimizer:
    """Adam with coupled L2 weight decay, as ``torch.optim.Adam``."""
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"adam betas must be in [0, 1), got {beta1}, {beta2}")

    def init(w: Tensor):
        return (0, torch.zeros_like(w), torch.zeros_like(w))

    def step(w: Tensor, g: Tensor, state: Any, lr: float):
        t, m, v = state
        t += 1
        d = g.add(w, alpha=weight_decay) if weight_decay else g
        m.mul_(beta1).add_(d, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
        return w.addcdiv_(m, denom, value=-lr / (1 - beta1**t)), (t, m, v)

    return LocalOptimizer(init=init, step=step)
