"""Example-level DP gradient oracles: DP-SGD, DP-SAT, DP-SAT-momentum, DP-SAM.

Every factory returns a ``DPOracle``, an ``fedflat.client.oracle_base.Oracle`` that also says
how many Gaussian releases it makes per local step and which noise multiplier the
accountant must record. One private release (``private_gradient``) is, on a Poisson
batch of expected size L (ALGORITHMS.md §4.1):

1. per-example gradients with ``torch.func.vmap(grad_and_value(...))`` over the batch,
   taken with respect to the parameter tensors (``FlatModel.unflatten(w)``);
2. clipping of each example to L2 norm C over all parameters (flat), or per parameter
   tensor with bounds C_l, Σ_l C_l² = C² (the total sensitivity stays C);
3. the sum of the clipped gradients plus ONE draw of N(0, σ²C² I) from the generator
   handed in (outside ``vmap``);
4. division by the EXPECTED batch size L, never the realised one. An empty batch gives
   pure noise / L (it is never resampled).

Per-example gradients are taken per parameter tensor rather than of the flat vector
``w``: differentiating through the flat slices makes autograd build one full [B, d]
zero-filled gradient per slice (measured 3.4-9x slower on an MLP and a GroupNorm CNN);
clipping and summing per tensor also avoids concatenating a [B, d] matrix.

Accounting. DP-SGD, DP-SAT and DP-SAT-momentum make one release per step: record
(σ, q, steps) with q = L / n. DP-SAM makes two releases per step ON THE SAME Poisson
batch. Those two Gaussian releases compose exactly into one Gaussian of multiplier σ/√2
applied to one subsampled batch, so account (σ/√2, q, steps), which is
``DPOracle.accounting_noise_multiplier``. Counting them as 2·steps independent
subsampled steps at σ under-reports ε (q = 0.01, σ = 1, T = 1000, δ = 1e-5, PLD: 4.48
versus 2.58).

The noise comes from the client generator (``torch.Generator``, not cryptographic): fine
for simulation, not for deployment (opacus#616).

References:
    Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
    https://arxiv.org/abs/1607.00133 (ALGORITHMS.md §4.1).
    Park, Kim, Kwon, Yoon, "Differentially Private Sharpness-Aware Training", ICML 2023,
    https://arxiv.org/abs/2306.05651 (ALGORITHMS.md §4.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedflat.client.oracle_base import Batch, Metrics, Oracle, UpdateContext
from fedflat.models.flat import FlatModel, Segment

LAYER_SPLITS: tuple[str, ...] = ("equal", "numel")

# Smallest norm divided by when clipping; a zero per-example gradient gets factor 1.
_TINY = 1e-12


class DPOracle(Oracle):
    """An ``Oracle`` that also states its Gaussian releases per step.

    It is a plain ``Oracle`` to ``client_update``; the extra attributes are for the
    run's accountant. (``_replace`` would drop them: rebuild with the factory instead.)

    Attributes:
        releases_per_step: Gaussian releases of the clipped-gradient sum per local step
            (1 for DP-SGD / DP-SAT, 2 for DP-SAM).
        noise_multiplier: σ of each release.
        accounting_noise_multiplier: σ/√releases_per_step, the multiplier of the single
            Gaussian that the releases of one step (same batch) compose into. Record
            ``accountant.step(accounting_noise_multiplier, q, steps)``.
    """

    releases_per_step: int
    noise_multiplier: float

    def __new__(
        cls,
        init: Callable[[UpdateContext], Any],
        grad: Callable[..., tuple[Tensor, Tensor, Any, Metrics]],
        passes: int = 1,
        releases_per_step: int = 1,
        noise_multiplier: float = 0.0,
    ) -> DPOracle:
        self = super().__new__(cls, init, grad, passes)
        # A tuple subclass without __slots__ has a __dict__; pickling restores it.
        self.releases_per_step = releases_per_step
        self.noise_multiplier = noise_multiplier
        return self

    @property
    def accounting_noise_multiplier(self) -> float:
        """σ of the one Gaussian mechanism per step the accountant must record."""
        return self.noise_multiplier / math.sqrt(self.releases_per_step)


def releases_per_step(oracle: Oracle) -> int:
    """Gaussian releases per local step of ``oracle`` (0 for a non-private oracle)."""
    return int(getattr(oracle, "releases_per_step", 0))


def history_entry(
    oracle: Oracle, *, sampling_rate: float, steps: int
) -> tuple[float, float, int]:
    """The (σ, q, T) history entry to record for ``steps`` local steps of a DP oracle.

    Args:
        oracle: a ``DPOracle`` from this module.
        sampling_rate: q = expected batch size / the client's sample count.
        steps: local steps actually run.

    Returns:
        ``(oracle.accounting_noise_multiplier, sampling_rate, steps)`` for
        ``Accountant.step`` / ``accounting.compute_epsilon``.

    Raises:
        ValueError: if ``oracle`` is not a DP oracle.
    """
    if not isinstance(oracle, DPOracle):
        raise ValueError(
            f"history_entry needs a DPOracle, got {type(oracle).__name__}"
        )
    return (oracle.accounting_noise_multiplier, float(sampling_rate), int(steps))


# ----------------------------------------------------------------------------- checks
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_number(name: str, value: Any, *, strict: bool, allow_inf: bool) -> float:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    _require(
        ok_type and not math.isnan(value), f"{name} must be a number, got {value!r}"
    )
    _require(allow_inf or math.isfinite(value), f"{name} must be finite, got {value!r}")
    bound_ok = value > 0 if strict else value >= 0
    _require(bound_ok, f"{name} must be {'>' if strict else '>='} 0, got {value!r}")
    return float(value)


class DPParams(NamedTuple):
    """Checked hyperparameters of one private release."""

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: float | None
    sampling_rate: float | None
    per_layer: bool
    layer_split: str


def _check_params(
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None,
    sampling_rate: float | None,
    per_layer: bool,
    layer_split: str,
) -> DPParams:
    c = _check_number("clip_norm", clip_norm, strict=True, allow_inf=True)
    z = _check_number(
        "noise_multiplier", noise_multiplier, strict=False, allow_inf=False
    )
    _require(
        not (z > 0 and math.isinf(c)),
        "clip_norm must be finite when noise_multiplier > 0, got "
        f"clip_norm={clip_norm}, noise_multiplier={noise_multiplier}",
    )
    _require(
        (expected_batch_size is None) != (sampling_rate is None),
        "give exactly one of expected_batch_size or sampling_rate, got "
        f"expected_batch_size={expected_batch_size}, sampling_rate={sampling_rate}",
    )
    if expected_batch_size is not None:
        expected_batch_size = _check_number(
            "expected_batch_size", expected_batch_size, strict=True, allow_inf=False
        )
    if sampling_rate is not None:
        sampling_rate = _check_number(
            "sampling_rate", sampling_rate, strict=True, allow_inf=False
        )
        _require(sampling_rate <= 1, f"sampling_rate must be <= 1, got {sampling_rate}")
    _require(
        layer_split in LAYER_SPLITS,
        f"layer_split must be one of {list(LAYER_SPLITS)}, got {layer_split!r}",
    )
    return DPParams(
        c, z, expected_batch_size, sampling_rate, bool(per_layer), layer_split
    )


def check_model(model: FlatModel) -> None:
    """Refuse models whose per-example gradients are not defined (BatchNorm).

    Raises:
        ValueError: if the module holds a BatchNorm layer.
    """
    if model.has_batchnorm:
        raise ValueError(
            "DP oracles need per-example gradients, but this model has BatchNorm, "
            "which mixes the examples of a batch (not DP, opacus#319); use GroupNorm "
            "instead (scenario: model.norm: group)"
        )


def expected_batch_size_for(params: DPParams, num_samples: int) -> float:
    """L for a client with ``num_samples`` examples.

    With ``expected_batch_size`` b this is min(b, n), the expected size of the Poisson
    batches of ``LocalSchedule(batch_size=b, batching="poisson")`` (rate min(1, b/n));
    with ``sampling_rate`` q it is q·n.
    """
    if params.expected_batch_size is None:  # _check_params: then sampling_rate is set
        return float(params.sampling_rate or 0.0) * num_samples
    if num_samples <= 0:
        return params.expected_batch_size
    return min(params.expected_batch_size, float(num_samples))


def layer_clip_norms(
    segments: Sequence[Segment], clip_norm: float, split: str = "equal"
) -> list[float]:
    """Per-tensor clip bounds C_l with Σ C_l² = C².

    Args:
        segments: the model's parameter segments (``FlatModel.segments``).
        clip_norm: the total bound C.
        split: "equal" (C_l = C/√K for K tensors) or "numel" (C_l = C·√(d_l/d)).

    Returns:
        One bound per segment, in segment order.
    """
    k = len(segments)
    if split == "equal":
        return [clip_norm / math.sqrt(k)] * k
    total = sum(s.numel for s in segments)
    return [clip_norm * math.sqrt(s.numel / total) for s in segments]


# ------------------------------------------------------------------------ one release
def per_example_grads(
    model: FlatModel, w: Tensor, x: Tensor, y: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients of ``model.loss_fn`` at ``w``, by parameter tensor.

    Each example is evaluated as a batch of one (``vmap`` over the batch axis of
    ``grad``), so nothing mixes examples.

    Returns:
        ``(grads, losses)``: ``grads[name]`` of shape [B, *param_shape] and
        ``losses`` [B].
    """
    params = model.unflatten(w.detach())

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model.module, p, (xi.unsqueeze(0),))
        return model.loss_fn(out, yi.unsqueeze(0))

    grads, losses = vmap(grad_and_value(one), in_dims=(None, 0, 0))(params, x, y)
    return grads, losses


class Release(NamedTuple):
    """One private gradient and what it did."""

    grad: Tensor  # [d] noisy sum / expected batch size
    loss: Tensor  # 0-d mean loss on the batch (NaN if empty; not private)
    metrics: Metrics


def private_gradient(
    model: FlatModel,
    w: Tensor,
    batch: Batch,
    gen: torch.Generator,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    layer_clips: Sequence[float] | None = None,
) -> Release:
    """One Gaussian release: (Σ_j clip(g_j) + N(0, σ²C² I)) / L (Abadi et al. 2016).

    Args:
        model: the flat model (no BatchNorm).
        w: flat parameters [d] (not mutated).
        batch: (x, y), possibly empty.
        gen: generator of the noise (one draw of d normals when σ > 0).
        clip_norm: C, the total L2 bound of one example's contribution.
        noise_multiplier: σ; noise std on the SUM is σ·C.
        expected_batch_size: L, the divisor (expected, not realised, batch size).
        layer_clips: per-tensor bounds C_l (Σ C_l² = C²) or None for flat clipping.

    Returns:
        ``Release(grad, loss, metrics)`` with metrics ``dp_frac_clipped`` (fraction of
        examples scaled down; 0 for an empty batch), ``dp_grad_norm`` (mean
        per-example norm before clipping; 0 for an empty batch) and ``dp_batch_size``
        (realised size).
    """
    x, y = batch
    b = int(y.shape[0])
    if b == 0:
        total = torch.zeros_like(w)
        loss = torch.tensor(float("nan"), device=w.device)
        metrics = {"dp_frac_clipped": 0.0, "dp_grad_norm": 0.0, "dp_batch_size": 0.0}
    else:
        grads, losses = per_example_grads(model, w, x, y)
        g_list = [grads[s.name].reshape(b, -1) for s in model.segments]
        # [B, K] per-example norms of each tensor (no [B, d_k] temporary).
        layer_norms = torch.stack(
            [torch.linalg.vector_norm(g, dim=1) for g in g_list], 1
        )
        norms = torch.linalg.vector_norm(layer_norms, dim=1)  # [B] total norms
        if layer_clips is None:
            # Zero-norm safe: C / max(‖g‖, tiny) ≥ 1 for tiny norms, then min with 1.
            factor = (clip_norm / norms.clamp_min(_TINY)).clamp(max=1.0)  # [B]
            clipped = factor < 1.0
            parts = [factor @ g for g in g_list]
        else:
            bounds = torch.tensor(layer_clips, dtype=norms.dtype, device=norms.device)
            factor_k = (bounds / layer_norms.clamp_min(_TINY)).clamp(max=1.0)  # [B, K]
            clipped = (factor_k < 1.0).any(1)
            parts = [factor_k[:, k] @ g for k, g in enumerate(g_list)]
        total = torch.cat(parts)
        loss = losses.detach().mean()
        metrics = {
            "dp_frac_clipped": float(clipped.float().mean()),
            "dp_grad_norm": float(norms.mean()),
            "dp_batch_size": float(b),
        }
    if noise_multiplier > 0:
        # One draw on the sum, outside vmap, from the caller's generator.
        noise = torch.randn(
            total.shape, generator=gen, device=gen.device, dtype=total.dtype
        ).to(total.device)
        total = total.add_(noise, alpha=noise_multiplier * clip_norm)
    return Release(total.div_(expected_batch_size), loss, metrics)


# ----------------------------------------------------------------------------- oracles
class DPState(NamedTuple):
    """State of a DP oracle within one client update.

    Attributes:
        expected_batch_size: L of this client (fixed at init).
        layer_clips: per-tensor bounds, or None for flat clipping.
        prev: DP-SAT: the previous released gradient ĝ_{t−1}; DP-SAT-momentum: the
            previous parameters w_{t−1}; None before the first step (and always for
            DP-SGD and DP-SAM).
    """

    expected_batch_size: float
    layer_clips: tuple[float, ...] | None
    prev: Tensor | None


def _make_init(params: DPParams) -> Callable[[UpdateContext], DPState]:
    def init(ctx: UpdateContext) -> DPState:
        check_model(ctx.model)
        clips = None
        if params.per_layer:
            clips = tuple(
                layer_clip_norms(
                    ctx.model.segments, params.clip_norm, params.layer_split
                )
            )
        return DPState(expected_batch_size_for(params, ctx.num_samples), clips, None)

    return init


def _release(
    params: DPParams,
    state: DPState,
    w: Tensor,
    batch: Batch,
    gen: torch.Generator,
    ctx: UpdateContext,
) -> Release:
    return private_gradient(
        ctx.model,
        w,
        batch,
        gen,
        clip_norm=params.clip_norm,
        noise_multiplier=params.noise_multiplier,
        expected_batch_size=state.expected_batch_size,
        layer_clips=state.layer_clips,
    )


def _direction(v: Tensor | None, rho: float) -> tuple[float, Tensor | None]:
    """(ρ/‖v‖, v); factor 0 when v is None or zero (ε = 0, as DP-SAT's first step)."""
    if v is None:
        return 0.0, None
    n = float(v.norm())
    return (rho / n, v) if n > 0 else (0.0, None)


def dp_sgd(
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    sampling_rate: float | None = None,
    per_layer: bool = False,
    layer_split: str = "equal",
) -> DPOracle:
    """DP-SGD gradient oracle (one private pass per step).

    Use with ``LocalSchedule(batching="poisson", batch_size=expected_batch_size)``: the
    accounting assumes Poisson batches.

    Args:
        clip_norm: C > 0, L2 bound of each per-example gradient (``inf`` only with
            σ = 0).
        noise_multiplier: σ ≥ 0; noise std on the sum is σ·C.
        expected_batch_size: L; a client with n examples divides by min(L, n) (the
            expected size of its Poisson batches). Give this or ``sampling_rate``.
        sampling_rate: q; a client with n examples divides by q·n.
        per_layer: clip each parameter tensor separately with Σ C_l² = C².
        layer_split: "equal" or "numel" (see ``layer_clip_norms``).

    Returns:
        A ``DPOracle`` (passes 1, releases_per_step 1). The loss is the mean loss of the
        batch at ``w`` (NaN if empty; not private, for logging only). Metrics
        ``dp_frac_clipped``, ``dp_grad_norm``, ``dp_batch_size``.

    Raises:
        ValueError: on a bad hyperparameter (factory) or a BatchNorm model (``init``).

    References:
        Abadi et al., CCS 2016, https://arxiv.org/abs/1607.00133 (ALGORITHMS.md §4.1).
    """
    p = _check_params(
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
        layer_split,
    )

    def grad(
        w: Tensor,
        batch: Batch,
        state: DPState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, DPState, Metrics]:
        r = _release(p, state, w, batch, gen, ctx)
        return r.loss, r.grad, state, r.metrics

    return DPOracle(_make_init(p), grad, 1, 1, p.noise_multiplier)


def _check_rho(rho: float) -> float:
    return _check_number("rho", rho, strict=False, allow_inf=False)


def dp_sat(
    *,
    rho: float,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    sampling_rate: float | None = None,
    per_layer: bool = False,
    layer_split: str = "equal",
) -> DPOracle:
    """DP-SAT: the private gradient at ``w + ρ ĝ_{t−1}/‖ĝ_{t−1}‖`` (one private pass).

    ĝ_{t−1} is the previous step's released (noisy, clipped, averaged) gradient, so
    the perturbation is post-processing and costs no privacy. ε_0 = 0: the first step of
    each client update is exactly DP-SGD. No pass is made at ``w`` itself, so the
    returned loss is the mean batch loss at the perturbed point (logging only).

    Args:
        rho: perturbation radius ρ ≥ 0 (paper: 0.01-0.1; 0.03 default in its code).
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
            layer_split: as ``dp_sgd``.

    Returns:
        A ``DPOracle`` (passes 1, releases_per_step 1); state carries ĝ_{t−1}. Metrics
        as ``dp_sgd`` plus ``dp_sat_perturbation`` (‖ε_t‖: ρ, or 0 on the first step).

    References:
        Park et al., ICML 2023, https://arxiv.org/abs/2306.05651 (ALGORITHMS.md §4.2);
        code JinseongP/DPSAT ``src/optim/minimizer.py`` ``DPSAT``.
    """
    r0 = _check_rho(rho)
    p = _check_params(
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
        layer_split,
    )

    def grad(
        w: Tensor,
        batch: Batch,
        state: DPState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, DPState, Metrics]:
        f, v = _direction(state.prev, r0)
        wp = w if v is None else torch.add(w, v, alpha=f)
        r = _release(p, state, wp, batch, gen, ctx)
        # Stored as a copy: the optimizer or a correction may reuse the returned tensor.
        m = {**r.metrics, "dp_sat_perturbation": r0 if v is not None else 0.0}
        return r.loss, r.grad, state._replace(prev=r.grad.clone()), m

    return DPOracle(_make_init(p), grad, 1, 1, p.noise_multiplier)


def dp_sat_momentum(
    *,
    rho: float,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    sampling_rate: float | None = None,
    per_layer: bool = False,
    layer_split: str = "equal",
) -> DPOracle:
    """DP-SAT-momentum: perturb along the previous parameter displacement.

    ε_t = ρ (w_{t−1} − w_t)/‖w_{t−1} − w_t‖ (free: parameters are public outputs);
    ε_0 = 0 and a zero displacement gives ε = 0. Otherwise as ``dp_sat``.

    Returns:
        A ``DPOracle`` (passes 1, releases_per_step 1); state carries w_{t−1}.

    References:
        Park et al., ICML 2023 (ALGORITHMS.md §4.2); code JinseongP/DPSAT
        ``src/optim/minimizer.py`` ``DPSATMomentum``.
    """
    r0 = _check_rho(rho)
    p = _check_params(
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
        layer_split,
    )

    def grad(
        w: Tensor,
        batch: Batch,
        state: DPState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, DPState, Metrics]:
        disp = None if state.prev is None else state.prev - w
        f, v = _direction(disp, r0)
        wp = w if v is None else torch.add(w, v, alpha=f)
        r = _release(p, state, wp, batch, gen, ctx)
        m = {**r.metrics, "dp_sat_perturbation": r0 if v is not None else 0.0}
        # The base optimizer updates w in place: keep a copy of w_t.
        return r.loss, r.grad, state._replace(prev=w.detach().clone()), m

    return DPOracle(_make_init(p), grad, 1, 1, p.noise_multiplier)


def dp_sam(
    *,
    rho: float,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    sampling_rate: float | None = None,
    per_layer: bool = False,
    layer_split: str = "equal",
) -> DPOracle:
    """DP-SAM: SAM with both gradients private (two private passes per step).

    ĝ = private gradient at w; ε = ρ ĝ/‖ĝ‖ (0 if ĝ = 0); the returned gradient is the
    private gradient at w + ε on the same batch, with fresh noise. Each release has
    multiplier σ; together they are one Gaussian of multiplier σ/√2 on one subsampled
    batch, which is what the accountant must record (``accounting_noise_multiplier``).

    Args:
        rho: radius ρ ≥ 0.
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
            layer_split: as ``dp_sgd``, for both releases.

    Returns:
        A ``DPOracle`` (passes 2, releases_per_step 2). Loss: mean batch loss at ``w``.
        Metrics: those of the second release plus ``dp_ascent_frac_clipped`` and
        ``dp_sam_loss_gap`` (L(w+ε) − L(w), not private).

    References:
        Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412 (SAM, §2.1) with the
        DP-SGD release of Abadi et al. 2016 for both passes; the DP-SAM baseline of
        Park et al., ICML 2023 (§4.2).
    """
    r0 = _check_rho(rho)
    p = _check_params(
        clip_norm, noise_multiplier, expected_batch_size, sampling_rate, per_layer,
        layer_split,
    )

    def grad(
        w: Tensor,
        batch: Batch,
        state: DPState,
        gen: torch.Generator,
        ctx: UpdateContext,
    ) -> tuple[Tensor, Tensor, DPState, Metrics]:
        first = _release(p, state, w, batch, gen, ctx)
        f, v = _direction(first.grad, r0)
        wp = w if v is None else torch.add(w, v, alpha=f)
        second = _release(p, state, wp, batch, gen, ctx)
        m = {
            **second.metrics,
            "dp_ascent_frac_clipped": first.metrics["dp_frac_clipped"],
            # 0 for an empty batch (both losses NaN) so step averages stay finite.
            "dp_sam_loss_gap": (
                float(second.loss - first.loss) if len(batch[1]) else 0.0
            ),
        }
        return first.loss, second.grad, state, m

    return DPOracle(_make_init(p), grad, 2, 2, p.noise_multiplier)


DP_ORACLES: dict[str, Callable[..., DPOracle]] = {
    "dp_sgd": dp_sgd,
    "dp_sat": dp_sat,
    "dp_sat_momentum": dp_sat_momentum,
    "dp_sam": dp_sam,
}
"""Factories by scenario name. Releases per step: dp_sam 2, the others 1."""
