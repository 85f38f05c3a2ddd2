"""Personal models next to the global one: the updates, as pure functions.

Every client i has its own test split — ``eval.client_test`` (``fedflat.data.client_test``),
the same split ``eval.per_client`` evaluates the global model on — and is evaluated there
with its personal model p_i; the global model w is evaluated on the same splits for
comparison. Personal models are trained with plain mini-batch SGD on the client's training
data (lr = ``client.lr``, batches of ``client.batch_size``), whatever oracle trains the
global model.

Methods (w^t = the global model the client receives in round t):
    finetune: p_i = w after k SGD steps on the client's data, computed at evaluation time
        from the current global model (nothing changes in training). The usual "FedAvg +
        fine-tuning" baseline (e.g. Yu et al. 2020, "Salvaging Federated Learning by Local
        Adaptation"; Wang et al. 2019).
    ditto: Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
        Personalization", ICML 2021, Algorithm 1. When client i takes part in round t it
        also runs s steps of  v_i ← v_i − η (∇F_i(v_i) + λ (v_i − w^t))  (the proximal pull
        is to the *received* w^t, not to the client's updated copy); v_i starts at w^t the
        first time. p_i = v_i (w for a client that never took part). λ → 0: purely local
        models; λ → ∞: the global one. The paper tunes λ ∈ {0.05, 0.1, 0.2, 0.5, 1, 2}.
    apfl: Deng, Kamani, Mahdavi, "Adaptive Personalized Federated Learning", 2020,
        Algorithm 1 with adaptive α. Client i keeps v_i and α_i ∈ [0, 1]; its personalized
        model is  v̄_i = α_i v_i + (1 − α_i) w. Per local step, with g = ∇F_i(v̄_i):
        v_i ← v_i − η α_i g   (= ∇_v F_i(v̄_i)),
        α_i ← clip_[0,1](α_i − η_α ⟨v_i − w, g⟩)   (= ∂F_i(v̄_i)/∂α, eq. 10).
        p_i = α_i v_i + (1 − α_i) w with the current global w.
        Deviation (documented pitfall): the paper mixes v_i with the client's *in-flight*
        local copy of w (updated in the same loop); here w is the round's received w^t,
        because the global model's local update is the shared ``client_update`` (its first
        step is identical; later steps differ by the local drift of w). The mixture is
        evaluated with the *current* global model, as in the paper.

Pitfalls: a personal model that is never trained (client never sampled) falls back to the
global one, so personalization gains concentrate on frequently sampled clients; with IID
clients the personal and the global model see the same distribution and no gain is
expected (the reproduction checks both). Personal training is not differentially private:
the scenario refuses personalization together with ``privacy``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from fedflat.client.update import LocalSchedule, batch_indices


class GradModel(Protocol):
    def loss_grad(self, w: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]: ...


def sgd_steps(model: GradModel, w: Tensor, x: Tensor, y: Tensor, *, lr: float, steps: int,
              batch_size: int, gen: torch.Generator) -> Tensor:
    """``steps`` mini-batch SGD steps from ``w`` (local fine-tuning)."""
    v = w.clone()
    for idx in batch_indices(len(y), LocalSchedule(batch_size=batch_size, steps=steps), gen):
        _, g = model.loss_grad(v, x[idx], y[idx])
        v = v - lr * g
    return v


def ditto_update(model: GradModel, v: Tensor, w_global: Tensor, x: Tensor, y: Tensor, *,
                 lam: float, lr: float, steps: int, batch_size: int,
                 gen: torch.Generator) -> Tensor:
    """Ditto's personal steps  v ← v − η(∇F(v) + λ(v − w^t))."""
    v = v.clone()
    for idx in batch_indices(len(y), LocalSchedule(batch_size=batch_size, steps=steps), gen):
        _, g = model.loss_grad(v, x[idx], y[idx])
        v = v - lr * (g + lam * (v - w_global))
    return v


def apfl_update(model: GradModel, v: Tensor, alpha: float, w_global: Tensor, x: Tensor,
                y: Tensor, *, lr: float, alpha_lr: float, steps: int, batch_size: int,
                gen: torch.Generator) -> tuple[Tensor, float]:
    """APFL's personal steps on v̄ = αv + (1−α)w (see the module docstring)."""
    v = v.clone()
    for idx in batch_indices(len(y), LocalSchedule(batch_size=batch_size, steps=steps), gen):
        mixed = alpha * v + (1.0 - alpha) * w_global
        _, g = model.loss_grad(mixed, x[idx], y[idx])
        grad_alpha = float(torch.dot(v - w_global, g))
        v = v - lr * alpha * g
        alpha = min(1.0, max(0.0, alpha - alpha_lr * grad_alpha))
    return v, alpha


def apfl_model(v: Tensor, alpha: float, w_global: Tensor) -> Tensor:
    """APFL's personalized model α v + (1 − α) w."""
    return alpha * v + (1.0 - alpha) * w_global
