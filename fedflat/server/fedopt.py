"""Adaptive server optimizers: FedAdam, FedYogi, FedAdagrad (ALGORITHMS.md §3.5).

The aggregate ``Δ̄`` (mean client delta, after the rule and any central noise) is the
negative pseudo-gradient. With ``k`` this step's own counter (never the round number):

    m_k = β1 m_{k−1} + (1 − β1) Δ̄
    Adagrad: v_k = v_{k−1} + Δ̄²
    Yogi:    v_k = v_{k−1} − (1 − β2) Δ̄² ⊙ sign(v_{k−1} − Δ̄²)
    Adam:    v_k = β2 v_{k−1} + (1 − β2) Δ̄²
    x ← x + η_g m_k / (√v_k + τ)

``bias_correction=False`` is the paper's Algorithm 2. ``bias_correction=True`` is the
Keras form the released experiment code used: the step size becomes
``η_g √(1 − β2^k)/(1 − β1^k)`` (τ stays outside the correction). Adagrad has no β2, so
only ``1/(1 − β1^k)`` applies (when β1 > 0). The steps go right after the rule (and
central noise) and set ``round.new_params``; they replace FedAvg.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fedflat.server.pipeline import Metrics, ServerRound, ServerStep


class FedOptState(NamedTuple):
    """count: steps taken by this optimizer; m, v: first/second moment estimates."""

    count: int
    m: Tensor
    v: Tensor


def _check(
    name: str, lr: float, beta1: float, beta2: float, tau: float, acc: float
) -> None:
    if not lr > 0:
        raise ValueError(f"{name} lr must be > 0, got {lr}")
    if not 0 <= beta1 < 1:
        raise ValueError(f"{name} beta1 must be in [0, 1), got {beta1}")
    if not 0 <= beta2 < 1:
        raise ValueError(f"{name} beta2 must be in [0, 1), got {beta2}")
    if not tau > 0:
        raise ValueError(f"{name} tau must be > 0, got {tau}")
    if not acc >= 0:
        raise ValueError(f"{name} initial_accumulator must be >= 0, got {acc}")


def _fedopt(
    kind: str,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    bias_correction: bool,
    initial_accumulator: float,
) -> ServerStep:
    name = f"fed{kind}"
    _check(name, lr, beta1, beta2, tau, initial_accumulator)

    def init(params: Tensor) -> FedOptState:
        return FedOptState(
            count=0,
            m=torch.zeros_like(params),
            v=torch.full_like(params, float(initial_accumulator)),
        )

    def apply(
        rnd: ServerRound, state: FedOptState, gen: torch.Generator
    ) -> tuple[ServerRound, FedOptState, Metrics]:
        if rnd.aggregate is None:
            raise ValueError(
                f"{name} needs an aggregate: put it after the aggregation rule"
            )
        delta = rnd.aggregate.to(state.m)
        count = state.count + 1
        m = torch.lerp(state.m, delta, 1.0 - beta1)  # β1 m + (1 − β1) Δ̄
        sq = delta.square()
        if kind == "adagrad":
            v = state.v + sq
        elif kind == "yogi":
            v = state.v - (1.0 - beta2) * sq * torch.sign(state.v - sq)
        else:
            v = torch.lerp(state.v, sq, 1.0 - beta2)
        step = lr
        if bias_correction:
            if beta1 > 0:
                step /= 1.0 - beta1**count
            if kind != "adagrad":
                step *= math.sqrt(1.0 - beta2**count)
        update = m / (v.sqrt() + tau) * step
        new_params = rnd.params + update.to(rnd.params)
        metrics = {f"{name}_update_norm": float(update.norm())}
        return rnd.with_(new_params=new_params), FedOptState(count, m, v), metrics

    return ServerStep(name=name, init=init, apply=apply)


def fedadam(
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = False,
    initial_accumulator: float = 0.0,
) -> ServerStep:
    """FedAdam server step.

    Args:
        lr: server learning rate η_g > 0 (Flower default 0.1; Reddi et al. best
            CIFAR-100 1.0).
        beta1: β1 in [0, 1).
        beta2: β2 in [0, 1) (paper text 0.99; released code Keras 0.999).
        tau: adaptivity τ > 0 (recommended start 1e-3).
        bias_correction: Keras-style bias correction (see module docstring).
        initial_accumulator: v_0 ≥ 0.

    References:
        Reddi et al., Adaptive Federated Optimization, ICLR 2021,
        https://arxiv.org/abs/2003.00295 (Algorithm 2).
    """
    return _fedopt(
        "adam",
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        bias_correction=bias_correction,
        initial_accumulator=initial_accumulator,
    )


def fedyogi(
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    bias_correction: bool = False,
    initial_accumulator: float = 0.0,
) -> ServerStep:
    """FedYogi server step (arguments as ``fedadam``; Flower default lr 0.01).

    References:
        Reddi et al., ICLR 2021, https://arxiv.org/abs/2003.00295 (Algorithm 2).
    """
    return _fedopt(
        "yogi",
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        bias_correction=bias_correction,
        initial_accumulator=initial_accumulator,
    )


def fedadagrad(
    *,
    lr: float,
    beta1: float = 0.0,
    tau: float = 1e-3,
    bias_correction: bool = False,
    initial_accumulator: float = 0.0,
) -> ServerStep:
    """FedAdagrad server step (no β2; other arguments as ``fedadam``).

    References:
        Reddi et al., ICLR 2021, https://arxiv.org/abs/2003.00295 (Algorithm 2).
    """
    return _fedopt(
        "adagrad",
        lr=lr,
        beta1=beta1,
        beta2=0.0,
        tau=tau,
        bias_correction=bias_correction,
        initial_accumulator=initial_accumulator,
    )
