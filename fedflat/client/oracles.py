"""SAM-family gradient oracles (ALGORITHMS.md §2, §3.7, §3.8).

Every oracle here follows the ``Oracle`` contract of ``fedflat.client.oracle_base``:
``grad(w, batch, state, gen, ctx) -> (loss, gradient, state, metrics)``. The flat
parameters ``w`` are never mutated: a perturbed point is a *new* tensor ``w + ε`` handed
to ``FlatModel.loss_grad``, so "restoring" ``w`` is exact (no subtraction of ε, no fp
drift). The returned gradient is a *replacement* gradient: weight decay and momentum are
added by the base optimizer afterwards (§1.1), so the perturbation is built from the raw
loss gradient unless ``wd_in_perturbation`` is asked for (SAM only).

BatchNorm (§1.2): running statistics come from pass 1 only. After pass 1 the oracle
takes a copy of all module buffers (float running mean/var *and* the integer
``num_batches_tracked`` counters) and writes it back after the last pass, so whatever
the later passes at perturbed points did to the buffers is undone. This is only done
when the module is in train mode and has buffers (in eval mode BN does not update its
statistics).

Pass counts (``Oracle.passes``): sgd 1, sam 2, asam 2, fisher_sam 2, sam_on 2,
fedsmoo 2, gam 4, lesam 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fedflat.client.local_chain import StepEnd
from fedflat.client.local_corrections import PREV_GLOBAL_UPDATE
from fedflat.client.oracle_base import Batch, Metrics, Oracle, UpdateContext, plain
from fedflat.models.flat import NORM_TYPES, FlatModel, Segment
from fedflat.scenario.local_rule import (
    AsamOracle,
    FedSmooOracle,
    FisherSamOracle,
    GamOracle,
    LesamOracle,
    OracleConfig,
    SamOnOracle,
    SamOracle,
    SgdOracle,
)

# Names of the vectors these oracles read from the server broadcast / client state.
FEDSMOO_S = "fedsmoo_s"  # FedSMOO global perturbation s, set by fedsmoo_server()
FEDSMOO_MU = "fedsmoo_mu"  # FedSMOO client dual mu_i (client state and uplink extra)

SegmentSelector = Callable[[Segment], bool]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def is_norm_segment(seg: Segment) -> bool:
    """Default SAM-ON selector: parameters owned by a normalisation layer (by type).

    Module types are ``fedflat.models.flat.NORM_TYPES`` (BatchNorm1d/2d, GroupNorm,
    LayerNorm, InstanceNorm2d), so a layer named e.g. ``bn1`` but of another type is not
    selected, and a GroupNorm named ``gn`` is.
    """
    return issubclass(seg.module_type, NORM_TYPES)


# ----------------------------------------------------------------------------- helpers
def _snapshot_buffers(model: FlatModel) -> list[Tensor] | None:
    """Copy of all module buffers if a later pass could change them, else None."""
    if not model.module.training:
        return None
    bufs = list(model.module.buffers())
    if not bufs:
        return None
    return [b.detach().clone() for b in bufs]


def _restore_buffers(model: FlatModel, snap: list[Tensor] | None) -> None:
    if snap is None:
        return
    with torch.no_grad():
        for b, s in zip(model.module.buffers(), snap, strict=True):
            b.copy_(s)


def _factor(scale: float, norm: Tensor, eps: float) -> float:
    """``scale / (norm + eps)``, and exactly 0 when ``norm + eps`` is zero.

    A zero gradient gives no perturbation instead of NaN (eps may be 0 for parity with
    the JAX reference, which divides by the exact norm). Returned as a Python float so
    that ``w + factor·v`` is one fused ``torch.add(w, v, alpha=factor)``.
    """
    denom = float(norm) + eps
    return scale / denom if denom > 0 else 0.0


def _loss_gap(loss_p: Tensor, loss: Tensor) -> float:
    # The ascent loss gap L(w+ε) - L(w) is the §7.4 sharpness proxy and comes for free.
    return float(loss_p - loss)


# ----------------------------------------------------------------------------- SAM
def sam(
    *,
    rho: float,
    eps: float = 1e-12,
    wd_in_perturbation: bool = False,
    weight_decay: float = 0.0,
) -> Oracle:
    """SAM: gradient at ``w + ρ g/(‖g‖ + eps)`` on the same batch (two passes).

    Args:
        rho: radius ρ of the L2 neighbourhood (≥ 0; 0 gives the plain gradient exactly).
        eps: ξ added to the norm (davda54/sam 1e-12; FL-Simulator 1e-7; JAX 0).
        wd_in_perturbation: build ε from ``g + λw`` (the JAX reference puts ½λ‖w‖² in
            the loss). The returned gradient is then ``∇L(w+ε) + λε`` so that, after the
            base optimizer adds ``λw``, the step uses ``∇[L + ½λ‖·‖²](w + ε)`` exactly.
        weight_decay: λ used when ``wd_in_perturbation``; must equal the base
            optimizer's weight decay for the identity above to hold.

    Returns:
        An ``Oracle`` with ``passes=2``. Metrics: ``sam_loss_gap`` = L(w+ε) − L(w).

    Raises:
        ValueError: if a hyperparameter is out of range.

    References:
        Foret et al., Sharpness-Aware Minimization, ICLR 2021,
        https://arxiv.org/abs/2010.01412 (ALGORITHMS.md §2.1).
    """
    _require(rho >= 0, f"sam rho must be >= 0, got {rho}")
    _require(eps >= 0, f"sam eps must be >= 0, got {eps}")
    _require(weight_decay >= 0, f"sam weight_decay must be >= 0, got {weight_decay}")
    use_wd = wd_in_perturbation and weight_decay > 0

    def grad(
        w: Tensor, batch: Batch, state: Any, gen: torch.Generator, ctx: UpdateContext
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        d = g.add(w, alpha=weight_decay) if use_wd else g
        f = _factor(rho, d.norm(), eps)  # ε = f·d
        loss_p, g_p = model.loss_grad(torch.add(w, d, alpha=f), *batch)
        _restore_buffers(model, snap)
        if use_wd:
            g_p = g_p.add(d, alpha=f * weight_decay)  # + λε
        return loss, g_p, state, {"sam_loss_gap": _loss_gap(loss_p, loss)}

    return Oracle(init=lambda ctx: (), grad=grad, passes=2)


# ----------------------------------------------------------------------------- ASAM
def asam(
    *,
    rho: float,
    eta: float = 0.0,
    variant: str = "official",
    eps: float | None = None,
) -> Oracle:
    """Adaptive SAM: ε = ρ T² g / ‖T g‖ with an element-wise scale T (two passes).

    Variants (ALGORITHMS.md §2.2):
        ``official`` (SamsungLabs/ASAM, debcaldarola/fedsam): ``T = |w| + η`` on tensors
        whose *name* contains ``"weight"`` (this includes norm-layer weights), ``T = 1``
        elsewhere (biases); eps 1e-16.
        ``davda54`` (davda54/sam ``adaptive=True``, FL-Simulator, DP-FedSAM):
        ``T = |w|`` on all tensors, no η; eps 1e-12. ``eta`` must then be 0.

    Args:
        rho: ρ (≥ 0). ASAM's ρ is typically ~10× SAM's (FedASAM CIFAR-10: 0.7).
        eta: η_a (≥ 0; FedASAM CIFAR-10: 0.2).
        variant: ``"official"`` or ``"davda54"``.
        eps: denominator guard; None = the variant's reference value.

    Returns:
        An ``Oracle`` with ``passes=2``.

    References:
        Kwon et al., ASAM, ICML 2021, https://arxiv.org/abs/2102.11600.
    """
    _require(rho >= 0, f"asam rho must be >= 0, got {rho}")
    _require(eta >= 0, f"asam eta must be >= 0, got {eta}")
    _require(
        variant in ("official", "davda54"),
        f"asam variant must be 'official' or 'davda54', got {variant!r}",
    )
    _require(
        variant == "official" or eta == 0,
        f"asam variant 'davda54' has no eta; it must be 0, got {eta}",
    )
    guard = eps if eps is not None else (1e-16 if variant == "official" else 1e-12)
    _require(guard >= 0, f"asam eps must be >= 0, got {guard}")

    def init(ctx: UpdateContext) -> Tensor | None:
        if variant == "davda54":
            return None
        # Stored inverted: True where T = 1 (tensors whose name lacks "weight").
        return ~ctx.model.mask(lambda s: "weight" in s.name)

    def grad(
        w: Tensor,
        batch: Batch,
        state: Tensor | None,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        t = w.abs() if state is None else w.abs().add_(eta).masked_fill_(state, 1.0)
        u = t * g
        f = _factor(rho, u.norm(), guard)  # ε = f·T·u
        loss_p, g_p = model.loss_grad(torch.add(w, t.mul_(u), alpha=f), *batch)
        _restore_buffers(model, snap)
        return loss, g_p, state, {"sam_loss_gap": _loss_gap(loss_p, loss)}

    return Oracle(init=init, grad=grad, passes=2)


# ----------------------------------------------------------------------------- GAM
def gam(
    *,
    grad_rho: float,
    grad_norm_rho: float,
    beta0: float,
    beta1: float,
    gamma: float,
    eps: float = 1e-12,
) -> Oracle:
    """GAM, the official accelerated four-pass version (ALGORITHMS.md §2.3(b)).

    With β2 = 1 − β0 and β3 = 1 − β1, on one batch:
    ``g0 = ∇L(w)``; ``g1 = ∇L(w + ρ_t ĝ0)``; ``e12 = ρ'_t (g1−g0)/‖g1−g0‖``;
    ``g2 = ∇L(w + e12)``; ``g3 = ∇L(w + e12 + ρ_t ĝ2)``; ``p = g0 + |β2| g2``;
    ``d = β1 g1 + β3 g3``; returns ``d − γ (p − cos(p,d)‖p‖ d/‖d‖)`` (p minus its
    projection on d, computed through the cosine with ``eps`` guards as the released
    code).

    Args:
        grad_rho: ρ_t, SAM radius of passes 2 and 4 (≥ 0).
        grad_norm_rho: ρ'_t, radius of the gradient-norm ascent (≥ 0).
        beta0: β0 in [0, 1].
        beta1: β1 in [0, 1].
        gamma: γ ≥ 0, weight of the orthogonal correction.
        eps: denominator guard (released code: 1e-12).

    Returns:
        An ``Oracle`` with ``passes=4``.

    References:
        Zhang et al., Gradient Norm Aware Minimization, CVPR 2023,
        https://arxiv.org/abs/2303.03108; code xxgege/GAM gam/gam.py.
    """
    _require(grad_rho >= 0, f"gam grad_rho must be >= 0, got {grad_rho}")
    _require(grad_norm_rho >= 0, f"gam grad_norm_rho must be >= 0, got {grad_norm_rho}")
    _require(0 <= beta0 <= 1, f"gam beta0 must be in [0, 1], got {beta0}")
    _require(0 <= beta1 <= 1, f"gam beta1 must be in [0, 1], got {beta1}")
    _require(gamma >= 0, f"gam gamma must be >= 0, got {gamma}")
    _require(eps >= 0, f"gam eps must be >= 0, got {eps}")
    beta2, beta3 = 1.0 - beta0, 1.0 - beta1

    def grad(
        w: Tensor, batch: Batch, state: Any, gen: torch.Generator, ctx: UpdateContext
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g0 = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        f0 = _factor(grad_rho, g0.norm(), eps)
        loss1, g1 = model.loss_grad(torch.add(w, g0, alpha=f0), *batch)
        r = g1 - g0
        w12 = torch.add(w, r, alpha=_factor(grad_norm_rho, r.norm(), eps))
        _, g2 = model.loss_grad(w12, *batch)
        f2 = _factor(grad_rho, g2.norm(), eps)
        _, g3 = model.loss_grad(w12.add_(g2, alpha=f2), *batch)  # w12 is ours to reuse
        _restore_buffers(model, snap)
        p = g0.add(g2, alpha=abs(beta2))
        d = g3.mul_(beta3).add_(g1, alpha=beta1)  # β1 g1 + β3 g3 (g3 is ours to reuse)
        p_norm, d_norm = float(p.norm()), float(d.norm())
        cosine = float(torch.dot(p, d)) / (d_norm * p_norm + eps)
        k = cosine * p_norm / (d_norm + eps)
        # d − γ (p − k d) = (1 + γk) d − γ p
        out = d.mul_(1.0 + gamma * k).sub_(p, alpha=gamma)
        return loss, out, state, {"sam_loss_gap": _loss_gap(loss1, loss)}

    return Oracle(init=lambda ctx: (), grad=grad, passes=4)


# ----------------------------------------------------------------------------- SAM-ON
class _SamOnState(NamedTuple):
    idx: Tensor  # [k] int64 positions of the perturbed (normalisation) parameters
    scaled: Tensor | None  # [k] bool: T ≠ 1 there (adaptive only)
    # layerwise only: [k] int64 index of each position's parameter tensor among the
    # selected ones, and how many there are (T = ‖w_tensor‖ (1 + η) is one value per tensor).
    tensor_id: Tensor | None = None
    num_tensors: int = 0


SAM_ON_P = ("2", "infinity")


def sam_on(
    *,
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize_bias: bool = False,
    p: int | str = 2,
    layerwise: bool = False,
    select: SegmentSelector | None = None,
    eps: float = 1e-16,
) -> Oracle:
    """SAM-ON: SAM (or ASAM) whose perturbation touches normalisation parameters only.

    The selected coordinates S come from ``FlatModel.segments`` through ``select``
    (default ``is_norm_segment``: by module type). Pass 1 takes the full gradient ``g``;
    ε is zero outside S and, on S (norms over S only):

    * ``p = 2`` (ℓ2 ball): ``ρ g_S/‖g_S‖`` (SAM-ON) or ``ρ T² g_S/‖T g_S‖`` (ASAM-ON);
    * ``p = "infinity"`` (ℓ∞ ball): ``ρ sign(g_S)`` or, adaptive, ``ρ T sign(g_S)``,
      with no normalisation (the reference's ``p='infinity'``).

    The ASAM-ON operator T is ``|w| + η`` element-wise, or with ``layerwise``
    ``‖w_l‖₂ (1 + η)``, one value per parameter tensor ``w_l`` (the reference's
    ``--layerwise``: ``torch.norm(p) * ones_like(p).add_(eta)``), on tensors whose name
    contains ``"weight"`` (also on biases if ``normalize_bias``); T = 1 elsewhere. Pass 2
    returns the gradient w.r.t. *all* parameters at ``w + ε``.

    Differences from the released code (mueller-mp/SAM-ON ``sam_bn.py``, used by
    ``train.py``): its ℓ∞ option exists only in the adaptive class ``ASAM_BN``, whose
    plain-SAM sibling ``SAM_BN`` ignores ``p``; here ``p = "infinity"`` without
    ``adaptive`` is ε = ρ sign(g_S) (T = 1). With neither ``--elementwise`` nor
    ``--layerwise`` the released ``ASAM_BN`` uses the signed T = w (its ``train.py``
    default); that undocumented case is not offered (for ``p = 2`` it equals
    element-wise with η = 0, since only T² and ‖T g‖ enter). The reference selects the
    perturbed tensors by name (``"norm"`` or ``"bn"``); here by module type.

    Args:
        rho: ρ ≥ 0 (larger than full SAM's is typical; the SAM-ON example uses 10 with
            ASAM-ON).
        adaptive: use the ASAM-ON element-wise (or layer-wise) operator T.
        eta: η_a ≥ 0 for ``adaptive``.
        normalize_bias: apply T to bias tensors too (``--normalize_bias``).
        p: the perturbation ball, ``2`` or ``"infinity"`` (the reference's ``--p``).
        layerwise: T = ‖w_l‖ (1 + η) per tensor instead of |w| + η (adaptive only).
        select: pluggable selector of perturbed segments.
        eps: denominator guard of the ℓ2 ball (released code: 1e-16).

    Returns:
        An ``Oracle`` with ``passes=2``. ``init`` raises ``ValueError`` when the model
        has no selected parameters (the method would silently be SGD at twice the cost).

    References:
        Müller et al., Normalization Layers Are All That Sharpness-Aware Minimization
        Needs, NeurIPS 2023, https://arxiv.org/abs/2306.04226; code mueller-mp/SAM-ON.
    """
    _require(rho >= 0, f"sam_on rho must be >= 0, got {rho}")
    _require(eta >= 0, f"sam_on eta must be >= 0, got {eta}")
    _require(eps >= 0, f"sam_on eps must be >= 0, got {eps}")
    ball = str(p)
    _require(ball in SAM_ON_P, f"sam_on p must be 2 or 'infinity', got {p!r}")
    _require(
        adaptive or not layerwise,
        "sam_on layerwise applies to the adaptive (ASAM-ON) operator; set adaptive: true",
    )
    chosen = select if select is not None else is_norm_segment

    def init(ctx: UpdateContext) -> _SamOnState:
        mask = ctx.model.mask(chosen)
        idx = mask.nonzero().squeeze(1)
        if idx.numel() == 0:
            raise ValueError(
                "sam_on: the model has no parameters accepted by the selector "
                "(no normalisation layers); use sam instead"
            )
        if not adaptive:
            return _SamOnState(idx=idx, scaled=None)
        tmask = ctx.model.mask(
            lambda s: chosen(s) and (normalize_bias or "weight" in s.name)
        )
        if not layerwise:
            return _SamOnState(idx=idx, scaled=tmask[idx])
        owner = torch.full((mask.numel(),), -1, dtype=torch.int64, device=mask.device)
        selected = [s for s in ctx.model.segments if chosen(s)]
        for j, s in enumerate(selected):
            owner[s.slice] = j
        return _SamOnState(idx=idx, scaled=tmask[idx], tensor_id=owner[idx],
                           num_tensors=len(selected))

    def operator(w_s: Tensor, state: _SamOnState) -> Tensor:
        """T on S (a fresh tensor): |w| + η, or ‖w_l‖ (1 + η); 1 where not scaled."""
        if state.tensor_id is None:
            base = w_s.abs() + eta
        else:
            sq = w_s.new_zeros(state.num_tensors).index_add_(0, state.tensor_id, w_s * w_s)
            base = sq.sqrt_().mul_(1.0 + eta)[state.tensor_id]
        assert state.scaled is not None  # noqa: S101 - adaptive only
        return torch.where(state.scaled, base, 1.0)

    def grad(
        w: Tensor,
        batch: Batch,
        state: _SamOnState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        g_s = g[state.idx]
        if ball == "infinity":
            e_s = g_s.sign().mul_(rho)
            if state.scaled is not None:
                e_s.mul_(operator(w[state.idx], state))
        elif state.scaled is None:
            e_s = g_s * _factor(rho, g_s.norm(), eps)
        else:
            t = operator(w[state.idx], state)
            u = t * g_s
            e_s = t.mul_(u).mul_(_factor(rho, u.norm(), eps))
        loss_p, g_p = model.loss_grad(w.index_add(0, state.idx, e_s), *batch)
        _restore_buffers(model, snap)
        return loss, g_p, state, {"sam_loss_gap": _loss_gap(loss_p, loss)}

    return Oracle(init=init, grad=grad, passes=2)


# ------------------------------------------------------------------------- Fisher-SAM
def fisher_sam(*, rho: float, eta_f: float = 1.0, eps: float = 1e-12) -> Oracle:
    """Fisher-SAM: ellipsoidal ball under the diagonal empirical Fisher ``1 + η_f g²``.

    ``ε = ρ (g/f) / sqrt(Σ g²/f)``, then the gradient at ``w + ε`` (two passes).

    Args:
        rho: γ of the paper, the radius (≥ 0; third-party default 0.1).
        eta_f: η_f ≥ 0 (third-party default 1.0).
        eps: added to the square root (zero-gradient guard).

    Returns:
        An ``Oracle`` with ``passes=2``.

    References:
        Kim et al., Fisher SAM, ICML 2022, https://arxiv.org/abs/2206.04920
        (ALGORITHMS.md §2.6).
    """
    _require(rho >= 0, f"fisher_sam rho must be >= 0, got {rho}")
    _require(eta_f >= 0, f"fisher_sam eta_f must be >= 0, got {eta_f}")
    _require(eps >= 0, f"fisher_sam eps must be >= 0, got {eps}")

    def grad(
        w: Tensor, batch: Batch, state: Any, gen: torch.Generator, ctx: UpdateContext
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        g_over_f = g / g.square().mul_(eta_f).add_(1.0)
        f = _factor(rho, torch.dot(g, g_over_f).sqrt(), eps)
        loss_p, g_p = model.loss_grad(torch.add(w, g_over_f, alpha=f), *batch)
        _restore_buffers(model, snap)
        return loss, g_p, state, {"sam_loss_gap": _loss_gap(loss_p, loss)}

    return Oracle(init=lambda ctx: (), grad=grad, passes=2)


# ----------------------------------------------------------------------------- FedLESAM
def lesam(*, rho: float, eps: float = 1e-12) -> Oracle:
    """FedLESAM: one pass at ``w + ε``, ε along the estimated *global* ascent direction.

    ``u = ctx.broadcast["prev_global_update"]`` is ``x_t − x_{t−1}`` (set by
    ``fedflat.server.correction_state.prev_update_broadcast``), so ``−u = x_{t−1} − x_t`` and
    ``ε = ρ (−u)/‖u‖``. ε is fixed for the whole client update and zero when ``u`` is
    missing (round 0) or zero.

    Paper and released code (MediaBrain-SJTU/FedLESAM ``optimizer/LESAM.py``,
    ``server/FedLESAM.py``, ``client/fedlesam.py``):

    * Direction. The paper uses, per client, the global model it received in its
      previous active round minus the current one, ``w_i^old − w_t``. The released
      server broadcasts the last round's global update ``η_g Δ̄_{t−1}`` to every client
      and perturbs along its negative. fedflat takes the released code's direction
      (``prev_global_update``); the two coincide when the client also took part in
      round ``t − 1`` (always under full participation).
    * Norm. Here the paper's global ℓ2 norm, so ‖ε‖ = ρ. The released ``first_step``
      divides by ``Σ_l ‖u[l]‖ + 1e-7`` and perturbs tensor ``l`` by ``−u[l]·scale``,
      where ``u`` is the *flat* update vector: ``u[l]`` is its l-th coordinate, a
      scalar, so every tensor is shifted by one constant taken from the first L
      coordinates of ``u`` (L = number of parameter tensors). fedflat does not copy
      this (ALGORITHMS.md §3.8: implement the definition).
    * The released client clips the gradient at ``w + ε`` to norm 10
      (``clip_grad_norm_(max_norm=10)``, as all its clients do); here that is the
      separate ``client.grad_clip: 10`` (off by default, also in the ``fedlesam`` preset).

    Note: the returned ``loss`` is the mini-batch loss at the perturbed point ``w + ε``
    (the only pass taken; an extra forward at ``w`` would cost ~1/3 pass). BatchNorm
    statistics come from that single pass.

    Args:
        rho: ρ ≥ 0 (example command of the paper's code: 0.5).
        eps: denominator guard.

    Returns:
        An ``Oracle`` with ``passes=1``.

    References:
        Fan et al., Locally Estimated Global Perturbations are Better than Local
        Perturbations for Federated Sharpness-aware Minimization, ICML 2024,
        https://arxiv.org/abs/2405.18890 (ALGORITHMS.md §3.8).
    """
    _require(rho >= 0, f"lesam rho must be >= 0, got {rho}")
    _require(eps >= 0, f"lesam eps must be >= 0, got {eps}")

    def init(ctx: UpdateContext) -> Tensor | None:
        u = ctx.broadcast.get(PREV_GLOBAL_UPDATE)
        if u is None or rho == 0:
            return None
        u = u.to(device=ctx.x_global.device, dtype=ctx.x_global.dtype)
        f = _factor(rho, u.norm(), eps)
        return None if f == 0.0 else u * -f

    def grad(
        w: Tensor,
        batch: Batch,
        state: Tensor | None,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        point = w if state is None else w + state
        loss, g = ctx.model.loss_grad(point, *batch)
        return loss, g, state, {}

    return Oracle(init=init, grad=grad, passes=1)


# ----------------------------------------------------------------------------- FedSMOO
class _SmooState(NamedTuple):
    mu: Tensor  # client perturbation dual μ_i
    s: Tensor  # global perturbation s (fixed during the update)


def fedsmoo(*, rho: float, eps: float = 1e-12) -> Oracle:
    """FedSMOO client: SAM with a dynamically corrected perturbation (two passes).

    Per step: ``g = ∇L(w)``; ``ĝ = g − (μ_i + s)``; ``ε = ρ ĝ/‖ĝ‖``;
    ``μ_i ← μ_i + ε − s``; returns ``∇L(w + ε)``. ``s`` is read from
    ``ctx.broadcast["fedsmoo_s"]`` and ``μ_i`` from ``ctx.client_state["fedsmoo_mu"]``
    (zeros if absent). The model dual (``h_i``) is FedDyn's: combine with
    ``fedflat.client.local_corrections.feddyn(alpha=λ)`` and the server steps
    ``feddyn_server`` + ``fedsmoo_server``.

    The final ``μ_i`` is the oracle's state; its ``finish`` returns client state and uplink
    extras ``{"fedsmoo_mu": μ_i}`` (unchanged when no step was taken).

    Args:
        rho: ρ ≥ 0 (FL-Simulator reference: 0.1).
        eps: denominator guard (FL-Simulator: 1e-7).

    Returns:
        An ``Oracle`` with ``passes=2`` and a ``finish``.

    References:
        Sun et al., Dynamic Regularized Sharpness Aware Minimization in Federated
        Learning, ICML 2023, https://arxiv.org/abs/2305.11584; code woodenchild95/
        FL-Simulator optimizer/DRegSAM.py (ALGORITHMS.md §3.8).
    """
    _require(rho >= 0, f"fedsmoo rho must be >= 0, got {rho}")
    _require(eps >= 0, f"fedsmoo eps must be >= 0, got {eps}")

    def _start(ctx: UpdateContext, name: str, store: dict[str, Tensor]) -> Tensor:
        v = store.get(name)
        if v is None:
            return torch.zeros_like(ctx.x_global)
        return v.to(device=ctx.x_global.device, dtype=ctx.x_global.dtype)

    def init(ctx: UpdateContext) -> _SmooState:
        return _SmooState(mu=_start(ctx, FEDSMOO_MU, ctx.client_state),
                          s=_start(ctx, FEDSMOO_S, ctx.broadcast))

    def grad(
        w: Tensor,
        batch: Batch,
        state: _SmooState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, Any, Metrics]:
        model = ctx.model
        loss, g = model.loss_grad(w, *batch)
        snap = _snapshot_buffers(model)
        g_hat = g - state.mu - state.s
        e = g_hat.mul_(_factor(rho, g_hat.norm(), eps))
        mu = state.mu + e - state.s
        loss_p, g_p = model.loss_grad(w + e, *batch)
        _restore_buffers(model, snap)
        metrics = {"sam_loss_gap": _loss_gap(loss_p, loss)}
        return loss, g_p, _SmooState(mu=mu, s=state.s), metrics

    def finish(state: _SmooState, end: StepEnd) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return {FEDSMOO_MU: state.mu}, {FEDSMOO_MU: state.mu}

    return Oracle(init=init, grad=grad, passes=2, finish=finish)


# ----------------------------------------------------------------------------- registry
class OracleEntry(NamedTuple):
    """An oracle's scenario config class and the factory its fields are the arguments of."""

    config: type[OracleConfig]
    factory: Callable[..., Oracle]


# The one table of oracles: the names are the configs' ``name`` literals, so the scenario
# union (fedflat.scenario.local_rule.ORACLE_CONFIGS) and this registry cannot disagree
# without tests/test_registry.py failing.
ORACLE_REGISTRY: dict[str, OracleEntry] = {
    entry.config.model_fields["name"].default: entry
    for entry in (
        OracleEntry(SgdOracle, plain),
        OracleEntry(SamOracle, sam),
        OracleEntry(AsamOracle, asam),
        OracleEntry(GamOracle, gam),
        OracleEntry(SamOnOracle, sam_on),
        OracleEntry(FisherSamOracle, fisher_sam),
        OracleEntry(LesamOracle, lesam),
        OracleEntry(FedSmooOracle, fedsmoo),
    )
}

ORACLE_NAMES: tuple[str, ...] = tuple(ORACLE_REGISTRY)


def build_oracle(cfg: OracleConfig, **context: Any) -> Oracle:
    """Call the factory of ``cfg``'s oracle with the config's fields.

    Args:
        cfg: a validated oracle block (a variant of ``OracleConfig``).
        **context: arguments that come from elsewhere in the scenario and that only some
            factories take (``weight_decay`` for SAM); those a factory does not take are
            dropped.

    Returns:
        The ``Oracle``.
    """
    factory = ORACLE_REGISTRY[cfg.name].factory
    accepted = inspect.signature(factory).parameters
    extra = {k: v for k, v in context.items() if k in accepted}
    return factory(**cfg.factory_kwargs(), **extra)


def make_oracle(name: str, **params: Any) -> Oracle:
    """Build a registered oracle by name with keyword hyperparameters.

    Names: sgd, sam, asam, gam, sam_on, fisher_sam, lesam, fedsmoo.

    Raises:
        ValueError: unknown name, unknown parameter, or a parameter out of range.
    """
    entry = ORACLE_REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown oracle {name!r}; known: {sorted(ORACLE_NAMES)}")
    factory = entry.factory
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(
            f"oracle {name!r} does not take {unknown}; "
            f"it takes {sorted(accepted) or 'nothing'}"
        )
    return factory(**params)
