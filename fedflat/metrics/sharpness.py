"""Sharpness metrics: Hessian-vector products, λ_max, Hessian trace, m-sharpness (§7).

All metrics evaluate the model with its module in **eval mode** (BatchNorm uses running
statistics and does not update them, dropout off); the previous mode is restored. The
loss is the model's ``loss_fn`` (the training criterion without regularisers). For a
list of batches, HVPs are accumulated as ``Σ_B |B| H_B v / Σ_B |B|`` (PyHessian's
``dataloader_hv_product``). Randomness (start vectors, probes, subset order) comes only
from the generator passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from fedflat.models.flat import FlatModel

Batch = tuple[Tensor, Tensor]


@contextmanager
def _eval_mode(model: FlatModel) -> Iterator[None]:
    was_training = model.module.training
    model.module.eval()
    try:
        yield
    finally:
        model.module.train(was_training)


def _rel_change(new: float, old: float) -> float:
    """PyHessian's stopping quantity ``|new − old| / (|old| + 1e-6)``."""
    return abs(new - old) / (abs(old) + 1e-6)


def _check_batches(batches: Sequence[Batch]) -> int:
    if len(batches) == 0:
        raise ValueError("sharpness metrics need at least one batch, got none")
    total = sum(len(y) for _, y in batches)
    if total == 0:
        raise ValueError("sharpness metrics need a non-empty batch")
    return total


def _hvp_operator(
    model: FlatModel, w: Tensor, batches: Sequence[Batch], *, cache_graph: bool
) -> Callable[[Tensor], Tensor]:
    """v ↦ Σ|B| H_B v / Σ|B| at ``w`` by double backprop (``∇⟨∇L(w), v⟩``).

    With ``cache_graph`` the first-order gradients (with their graphs) are built once
    and reused by every product (memory grows with the number of batches); otherwise
    each product rebuilds them batch by batch.
    """
    total = _check_batches(batches)
    w0 = w.detach()

    def first_order(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        wr = w0.clone().requires_grad_(True)
        loss = model.functional_loss(wr, x, y)
        (g,) = torch.autograd.grad(loss, wr, create_graph=True)
        return wr, g

    cache = [first_order(x, y) for x, y in batches] if cache_graph else None

    def apply(v: Tensor) -> Tensor:
        out = torch.zeros_like(w0)
        for i, (x, y) in enumerate(batches):
            wr, g = cache[i] if cache is not None else first_order(x, y)
            (hv,) = torch.autograd.grad(
                g, wr, grad_outputs=v, retain_graph=cache is not None
            )
            out.add_(hv, alpha=len(y) / total)
        return out

    return apply


def hvp(model: FlatModel, w: Tensor, batches: Sequence[Batch], v: Tensor) -> Tensor:
    """Hessian-vector product of the mean loss over ``batches`` at ``w``.

    Args:
        model: the flat model (its module is put in eval mode for the computation).
        w: flat parameters (not modified).
        batches: list of (x, y); the result is ``Σ|B| H_B v / Σ|B|``.
        v: flat direction like ``w``.

    Returns:
        ``H v`` as a flat tensor.

    References:
        Pearlmutter, Fast Exact Multiplication by the Hessian, Neural Computation 1994;
        PyHessian (Yao et al., 2020), https://arxiv.org/abs/1912.07145.
    """
    with _eval_mode(model):
        return _hvp_operator(model, w, batches, cache_graph=False)(v.detach())


class EigenResult(NamedTuple):
    """Result of ``lambda_max``.

    value: λ of largest magnitude (with its sign); iterations: HVPs used; vector: unit
    eigenvector estimate.
    """

    value: float
    iterations: int
    vector: Tensor


def lambda_max(
    model: FlatModel,
    w: Tensor,
    batches: Sequence[Batch],
    *,
    gen: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-3,
    cache_graph: bool = True,
) -> EigenResult:
    """Top Hessian eigenvalue by power iteration (ALGORITHMS.md §7.1, PyHessian).

    ``v ~ N(0, I)`` from ``gen``, normalised; each iteration ``λ = ⟨Hv, v⟩``,
    ``v ← Hv/‖Hv‖``; stop when ``|λ − λ_prev|/(|λ_prev| + 1e-6) < tol``. Power iteration
    finds the eigenvalue of largest *magnitude*, which is negative where negative
    curvature dominates: the sign is reported as is.

    Args:
        model, w, batches: as for ``hvp``.
        gen: generator of the start vector.
        max_iter: at most this many HVPs (≥ 1).
        tol: relative-change stopping tolerance (≥ 0).
        cache_graph: keep the first-order graphs between iterations (faster, more
            memory).

    Returns:
        ``EigenResult(value, iterations, vector)``.
    """
    if max_iter < 1:
        raise ValueError(f"lambda_max max_iter must be >= 1, got {max_iter}")
    if tol < 0:
        raise ValueError(f"lambda_max tol must be >= 0, got {tol}")
    with _eval_mode(model):
        op = _hvp_operator(model, w, batches, cache_graph=cache_graph)
        v = torch.randn(w.numel(), generator=gen, device=gen.device).to(w)
        v = v / v.norm()
        lam_prev: float | None = None
        lam, it = 0.0, 0
        for it in range(1, max_iter + 1):  # noqa: B007 - `it` is read after the loop
            hv = op(v)
            lam = float(torch.dot(hv, v))
            norm = hv.norm()
            if not bool(norm > 0):  # v in the null space: H v = 0 exactly
                break
            v = hv / norm
            if lam_prev is not None and _rel_change(lam, lam_prev) < tol:
                break
            lam_prev = lam
        return EigenResult(value=lam, iterations=it, vector=v.detach())


class TraceResult(NamedTuple):
    """Result of ``hessian_trace``.

    mean: Hutchinson estimate of tr(H); std_error: std of the samples / √n;
    samples: number of probes n.
    """

    mean: float
    std_error: float
    samples: int


def hessian_trace(
    model: FlatModel,
    w: Tensor,
    batches: Sequence[Batch],
    *,
    gen: torch.Generator,
    max_iter: int = 100,
    tol: float = 1e-3,
    cache_graph: bool = True,
) -> TraceResult:
    """Hessian trace by Hutchinson's estimator with Rademacher probes (§7.2).

    ``E[vᵀHv] = tr(H)`` for ``v`` with independent ±1 entries (drawn from ``gen``).
    Stops when the running mean changes by less than ``tol`` relatively (PyHessian's
    rule) or after ``max_iter`` probes; ``tol=0`` always uses ``max_iter`` probes.

    Returns:
        ``TraceResult(mean, std_error, samples)``; std_error is 0 for one sample.

    References:
        Hutchinson, A stochastic estimator of the trace of the influence matrix, 1990;
        PyHessian ``trace``.
    """
    if max_iter < 1:
        raise ValueError(f"hessian_trace max_iter must be >= 1, got {max_iter}")
    if tol < 0:
        raise ValueError(f"hessian_trace tol must be >= 0, got {tol}")
    with _eval_mode(model):
        op = _hvp_operator(model, w, batches, cache_graph=cache_graph)
        samples: list[float] = []
        prev_mean: float | None = None
        for _ in range(max_iter):
            v = torch.randint(0, 2, (w.numel(),), generator=gen, device=gen.device)
            v = (v * 2 - 1).to(w)
            samples.append(float(torch.dot(op(v), v)))
            mean = sum(samples) / len(samples)
            if prev_mean is not None and _rel_change(mean, prev_mean) < tol:
                break
            prev_mean = mean
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return TraceResult(mean=mean, std_error=0.0, samples=n)
    var = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return TraceResult(mean=mean, std_error=math.sqrt(var / n), samples=n)


class MSharpness(NamedTuple):
    """value: S_m estimate; m, rho, k: its parameters; subsets: number of subsets."""

    value: float
    m: int
    rho: float
    k: int
    subsets: int


def m_sharpness(
    model: FlatModel,
    w: Tensor,
    data: Batch,
    *,
    m: int,
    rho: float,
    k: int = 1,
    step_size: float | None = None,
    gen: torch.Generator | None = None,
    eps: float = 1e-12,
) -> MSharpness:
    """SAM's m-sharpness (§7.3).

    ``S_m = (1/n) Σ_s max_{‖ε‖≤ρ} Σ_{i∈s} [ℓ_i(w+ε) − ℓ_i(w)]``.

    The data are split into consecutive subsets of ``m`` examples (after a permutation
    drawn from ``gen`` when given; a last smaller subset is kept, with its own size as
    weight). For each subset the inner max is approximated by ``k`` steps of projected
    normalised gradient ascent from ``ε = 0``: ``ε ← Π_ρ(ε + a ∇L_s(w+ε)/‖∇L_s(w+ε)‖)``
    with step ``a = step_size or ρ`` (so ``k = 1`` is SAM's ``ε = ρ g_s/‖g_s‖``); the
    subset's value is the largest loss increase among the k iterates (0 if the gradient
    vanishes at the start).

    Args:
        model, w: as for ``hvp``.
        data: (x, y) of the whole evaluation set.
        m: subset size ≥ 1 (e.g. the local batch size, or a client's whole dataset).
        rho: ρ ≥ 0.
        k: ascent steps ≥ 1.
        step_size: ascent step; None = ρ.
        gen: optional generator for the subset order.
        eps: zero-norm guard.

    Returns:
        ``MSharpness(value, m, rho, k, subsets)``.

    References:
        Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412 (§4, m-sharpness).
    """
    if m < 1:
        raise ValueError(f"m_sharpness m must be >= 1, got {m}")
    if rho < 0:
        raise ValueError(f"m_sharpness rho must be >= 0, got {rho}")
    if k < 1:
        raise ValueError(f"m_sharpness k must be >= 1, got {k}")
    a = rho if step_size is None else step_size
    if a < 0:
        raise ValueError(f"m_sharpness step_size must be >= 0, got {a}")
    x, y = data
    n = len(y)
    if n == 0:
        raise ValueError("m_sharpness needs a non-empty data set")
    order = None
    if gen is not None:
        order = torch.randperm(n, generator=gen, device=gen.device).to(y.device)
    w0 = w.detach()
    total = 0.0
    subsets = 0
    with _eval_mode(model):
        for start in range(0, n, m):
            sel = slice(start, start + m) if order is None else order[start : start + m]
            xs, ys = x[sel], y[sel]
            loss0, g = model.loss_grad(w0, xs, ys)
            eps_vec = torch.zeros_like(w0)
            best = 0.0 if not bool(g.norm() > 0) else -math.inf
            for step in range(k):
                if step > 0:
                    _, g = model.loss_grad(w0 + eps_vec, xs, ys)
                gnorm = g.norm()
                if not bool(gnorm > 0):
                    break
                eps_vec = eps_vec + g * (a / (gnorm + eps))
                enorm = eps_vec.norm()
                if bool(enorm > rho):
                    eps_vec = eps_vec * (rho / enorm)
                with torch.no_grad():
                    loss_e = model.functional_loss(w0 + eps_vec, xs, ys)
                best = max(best, float(loss_e - loss0))
            total += len(ys) * best
            subsets += 1
    return MSharpness(value=total / n, m=m, rho=rho, k=k, subsets=subsets)
