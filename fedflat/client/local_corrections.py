"""Client-drift corrections: steps of the local chain that adjust the oracle's gradient.

Each factory returns a ``fedflat.client.local_chain.LocalStep`` named after the method.
``init`` builds its state from the update context (the global model, the client's
persistent state, the server broadcast); ``update`` maps the gradient so far to the
corrected one (the state is fixed during the update); ``finish`` returns the client's new
persistent state and the extra vectors it sends to the server (e.g. SCAFFOLD's Δc_i). Their
server halves are in ``fedflat.server.correction_state``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fedflat.client.local_chain import LocalStep, StepEnd, StepInput, StepMetrics
from fedflat.client.oracle_base import UpdateContext

Step = tuple[Tensor, Any, StepMetrics]


def fedprox(*, mu: float) -> LocalStep:
    """FedProx (Li et al., MLSys 2020): gradient of (mu/2)||y - x||^2 added to every step.

    References: https://arxiv.org/abs/1812.06127
    """
    if mu < 0:
        raise ValueError(f"fedprox mu must be >= 0, got {mu}")

    def update(g: Tensor, state: Any, at: StepInput) -> Step:
        return g.add(at.w - at.ctx.x_global, alpha=mu), state, {}

    return LocalStep("fedprox", init=lambda ctx: (), update=update)  # keeps no client state


# Names of the vectors the corrections below read and write (broadcast, client state,
# uplink extras).
SCAFFOLD_C = "scaffold_c"  # server control variate c (broadcast)
SCAFFOLD_CI = "scaffold_ci"  # client control variate c_i (client state)
SCAFFOLD_DC = "scaffold_dc"  # Δc_i = c_i⁺ − c_i (uplink extra)
FEDDYN_GRAD = "feddyn_grad"  # FedDyn client dual g_i (client state)
PREV_GLOBAL_UPDATE = "prev_global_update"  # x_t − x_{t−1} (broadcast)
PREV_STEPS_LR = "prev_steps_lr"  # mean K·η of the previous round's clients (broadcast)
MOFEDSAM_STEPS_LR = "mofedsam_steps_lr"  # this client's K·η, shape [1] (uplink extra)


def _like(ctx: UpdateContext, store: dict[str, Tensor], name: str) -> Tensor | None:
    """``store[name]`` on the device/dtype of the global model, or None if absent."""
    v = store.get(name)
    if v is None:
        return None
    return v.to(device=ctx.x_global.device, dtype=ctx.x_global.dtype)


def scaffold() -> LocalStep:
    """SCAFFOLD, option II (Karimireddy et al., ICML 2020), client side.

    Every step uses ``g + c − c_i``; ``c`` comes from ``ctx.broadcast["scaffold_c"]``
    and ``c_i`` from ``ctx.client_state["scaffold_ci"]`` (zeros when absent, i.e. in the
    first round / at a client's first participation). At the end, with K the steps
    actually taken and η the learning rate used, ``c_i⁺ = c_i − c + (x − y)/(K η)``;
    ``finish`` returns client state ``{"scaffold_ci": c_i⁺}`` and the uplink extra
    ``{"scaffold_dc": c_i⁺ − c_i}``. A client that took no step keeps ``c_i``
    (``Δc_i = 0``). Pair with ``fedflat.server.correction_state.scaffold_server``.

    References:
        https://arxiv.org/abs/1910.06378 (ALGORITHMS.md §3.3).
    """

    def init(ctx: UpdateContext) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        c = _like(ctx, ctx.broadcast, SCAFFOLD_C)
        ci = _like(ctx, ctx.client_state, SCAFFOLD_CI)
        if c is None and ci is None:
            return None, None, None  # both zero: the correction is the identity
        diff = (c if c is not None else 0.0) - (ci if ci is not None else 0.0)
        return c, ci, diff

    def update(g: Tensor, state: Any, at: StepInput) -> Step:
        diff = state[2]
        return (g if diff is None else g + diff), state, {}

    def finish(state: Any, end: StepEnd) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        y, steps, lr, ctx = end
        c, ci, _ = state
        ci_old = ci if ci is not None else torch.zeros_like(ctx.x_global)
        if steps <= 0 or lr <= 0:
            # No local progress: option II has nothing to estimate from.
            return {SCAFFOLD_CI: ci_old}, {SCAFFOLD_DC: torch.zeros_like(ci_old)}
        ci_new = (ctx.x_global - y) / (steps * lr) + ci_old
        if c is not None:
            ci_new = ci_new - c
        return {SCAFFOLD_CI: ci_new}, {SCAFFOLD_DC: ci_new - ci_old}

    return LocalStep("scaffold", init=init, update=update, finish=finish)


def feddyn(*, alpha: float) -> LocalStep:
    """FedDyn (Acar et al., ICLR 2021), client side, in the paper's form.

    Local objective ``L_i(y) − ⟨g_i, y⟩ + (α/2)‖y − x‖²``: every step uses
    ``g − g_i + α (y − x)``; at the end ``g_i ← g_i − α (y − x)``. ``g_i`` is kept in
    ``ctx.client_state["feddyn_grad"]`` (zeros when absent). This is algebraically the
    FL-Simulator form ``∇L + α(y − x) + α H_i`` with ``H_i = Σ past Δ_i = −g_i/α``
    (ALGORITHMS.md §3.4). No uplink extra: the server step
    ``fedflat.server.correction_state.feddyn_server`` uses the deltas.

    Args:
        alpha: α > 0 (FL-Simulator reference 0.1; paper grid {0.1, 0.01, 0.001}).

    References:
        https://arxiv.org/abs/2111.04263
    """
    if not alpha > 0:
        raise ValueError(f"feddyn alpha must be > 0, got {alpha}")

    def update(g: Tensor, state: Tensor | None, at: StepInput) -> Step:
        out = torch.add(g, at.w - at.ctx.x_global, alpha=alpha)
        return (out if state is None else out.sub_(state)), state, {}

    def finish(state: Tensor | None, end: StepEnd) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        x = end.ctx.x_global
        gi = state if state is not None else torch.zeros_like(x)
        return {FEDDYN_GRAD: gi - alpha * (end.y - x)}, {}

    return LocalStep("feddyn", init=lambda ctx: _like(ctx, ctx.client_state, FEDDYN_GRAD),
                     update=update, finish=finish)


def mofedsam(*, alpha: float) -> LocalStep:
    """MoFedSAM's client momentum (Qu et al., ICML 2022, as FL-Simulator implements it).

    Every step uses ``α g + (1 − α) m`` with the momentum
    ``m = −u / (K η)_prev``: ``u = ctx.broadcast["prev_global_update"]`` (x_t − x_{t−1})
    and ``(K η)_prev = ctx.broadcast["prev_steps_lr"]``, the mean over the previous
    round's clients of local steps × learning rate. Both are broadcast by
    ``fedflat.server.correction_state.prev_update_broadcast``; this correction uplinks its
    own ``K η`` as the extra ``"mofedsam_steps_lr"`` (shape [1]) for that purpose.
    ``m = 0`` while no previous update exists (round 0), as in the reference. Put it
    *first* among the corrections so that α scales the oracle's (SAM) gradient only.

    FL-Simulator normalises by the previous round's lr and K = E·n_0/b of client 0; the
    mean K·η of the participants is the same when clients are alike. With a server lr
    η_g ≠ 1, u = η_g Δ̄ (the reference uses Δ̄).

    Args:
        alpha: α in (0, 1] (FL-Simulator reference 0.05 / 0.1).

    References:
        Qu et al., Generalized Federated Learning via Sharpness Aware Minimization,
        ICML 2022, https://arxiv.org/abs/2206.02618 (ALGORITHMS.md §3.7).
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"mofedsam alpha must be in (0, 1], got {alpha}")

    def init(ctx: UpdateContext) -> Tensor | None:
        u = _like(ctx, ctx.broadcast, PREV_GLOBAL_UPDATE)
        if u is None:
            return None
        steps_lr = ctx.broadcast.get(PREV_STEPS_LR)
        if steps_lr is None:
            raise ValueError(
                "mofedsam: the broadcast has 'prev_global_update' but no "
                "'prev_steps_lr'; the server pipeline needs prev_update_broadcast() "
                "and every client the mofedsam correction"
            )
        kl = float(steps_lr.reshape(-1)[0])
        if not kl > 0:
            return None
        return u * (-(1.0 - alpha) / kl)

    def update(g: Tensor, state: Tensor | None, at: StepInput) -> Step:
        out = g * alpha
        return (out if state is None else out.add_(state)), state, {}

    def finish(state: Any, end: StepEnd) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        x = end.ctx.x_global
        kl = torch.tensor([float(end.steps) * float(end.lr)], dtype=x.dtype)
        return {}, {MOFEDSAM_STEPS_LR: kl.to(x.device)}

    return LocalStep("mofedsam", init=init, update=update, finish=finish)
