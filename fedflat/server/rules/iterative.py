"""Iterative rules: geometric median (smoothed Weiszfeld, RFA), centered clipping, CAF.

Python loops run only over the iterations. A Weiszfeld or clipping iteration is O(n d)
(distances to the current point by the direct, cancellation-free path, then one
weighted sum); a CAF iteration is O(n^3) on the n x n float64 Gram matrix, built once
in O(n^2 d).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fedflat.server.rules.common import (
    _default,
    _require_float,
    _require_int,
    _require_n,
    check_deltas,
    check_weights,
    dists_to,
    normalized_weights,
    pairwise_sq_dists,
    weighted_mean,
)


def check_gm_params(p: dict[str, Any]) -> dict[str, Any]:
    """Check the geometric median's nu, max_iters, tol, init (and max_update_norm if
    present) in place; return ``p`` with the floats as floats."""
    p["nu"] = _require_float("nu", p["nu"], low=0.0, strict=True)
    _require_int("max_iters", p["max_iters"], 1)
    p["tol"] = _require_float("tol", p["tol"], low=0.0, strict=False)
    if p["init"] not in ("mean", "zero"):
        raise ValueError(f"init must be 'mean' or 'zero', got {p['init']!r}")
    if p.get("max_update_norm") is not None:
        p["max_update_norm"] = _require_float(
            "max_update_norm", p["max_update_norm"], low=0.0, strict=True
        )
    return p


def weiszfeld(
    x: Tensor, alpha: Tensor, *, nu: float, max_iters: int, tol: float, init: str
) -> tuple[Tensor, int, float]:
    """Smoothed Weiszfeld iterations; returns (z, iterations run, objective at z)."""
    z = alpha.to(x.dtype) @ x if init == "mean" else torch.zeros_like(x[0])
    dist = dists_to(x, z)
    obj = float((alpha * dist).sum())
    iters = 0
    while iters < max_iters:
        iters += 1
        beta = alpha / dist.clamp_min(nu)
        z = (beta / beta.sum()).to(x.dtype) @ x
        dist = dists_to(x, z)
        new_obj = float((alpha * dist).sum())
        converged = abs(obj - new_obj) < tol * new_obj
        obj = new_obj
        if converged:
            break
    return z, iters, obj


def geometric_median(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    nu: float = _default("nu"),
    max_iters: int = _default("max_iters"),
    tol: float = _default("tol"),
    init: str = _default("init"),
) -> Tensor:
    """Geometric median by smoothed Weiszfeld iterations (RFA).

    Approximately minimises sum_i alpha_i ||z - x_i|| with alpha_i = w_i / sum_j w_j:
    beta_i = alpha_i / max(nu, ||z - x_i||), z <- sum_i beta_i x_i / sum_i beta_i, at
    most ``max_iters`` times, stopping once the objective changes by less than ``tol``
    times its value. Defaults: RFA's weighted-mean start, nu = 1e-5 and tol = 1e-6, with
    a cap of 100 iterations so that the iterations converge (RFA's official budget of 4
    iterations, ``max_iters=4``, can stop far from the geometric median under attack:
    3 of 11 inputs at 1e6 leave coordinates of ~7e3). The epfml variant is init="zero",
    nu=0.1, max_iters=8 or 3.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights (alpha ∝ n_i in RFA).
        nu: smoothing > 0.
        max_iters: cap on the iterations >= 1 (4 = RFA official).
        tol: relative objective decrease to stop at (>= 0).
        init: "mean" (weighted mean) or "zero".

    Returns:
        [d] aggregate.

    References:
        Pillutla, Kakade, Harchaoui, "Robust Aggregation for Federated Learning", IEEE
        Trans. Signal Processing 2022 (code: krishnap25/RFA
        ``geometric_median_update``).
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    p = check_gm_params({"nu": nu, "max_iters": max_iters, "tol": tol, "init": init})
    z, _, _ = weiszfeld(
        x,
        normalized_weights(w, x.shape[0], x),
        nu=p["nu"],
        max_iters=p["max_iters"],
        tol=p["tol"],
        init=p["init"],
    )
    return z


def clip_iterations(
    x: Tensor, alpha: Tensor, v: Tensor, *, tau: float, iters: int
) -> tuple[Tensor, float]:
    """Centered-clipping iterations; returns (v, fraction clipped in the last one)."""
    frac = 0.0
    for _ in range(iters):
        dist = dists_to(x, v)
        # min(1, tau / ||x_i - v||); a zero distance gives a huge ratio, hence 1.
        scale = (tau / dist.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
        coef = alpha * scale  # [n] float64
        frac = float((scale < 1.0).to(torch.float64).mean())
        # v + sum_i coef_i (x_i - v) without forming the [n, d] differences.
        v = coef.to(x.dtype) @ x + (1.0 - float(coef.sum())) * v
    return v, frac


def centered_clipping(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    center: Tensor | None = None,
    tau: float = _default("tau"),
    iters: int = _default("iters"),
) -> Tensor:
    """Centered clipping: L clipped averaging steps around the previous aggregate.

    Repeats ``iters`` times v <- v + sum_i alpha_i (x_i - v) min(1, tau / ||x_i - v||),
    alpha uniform (1/n, as the reference) or normalised weights. v starts at ``center``
    (the previous round's output, kept by ``apply_rule`` in the rule state; zero at the
    first round as in the reference code).

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights.
        center: [d] starting point v, default zeros.
        tau: clipping radius > 0 (``math.inf``: one iteration from 0 gives the mean).
        iters: iterations L >= 1.

    Returns:
        [d] aggregate v.

    References:
        Karimireddy, He, Jaggi, "Learning from History for Byzantine Robust
        Optimization", ICML 2021 (code: epfml/byzantine-robust-optimizer clipping.py).
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    tau = _require_float("tau", tau, low=0.0, strict=True)
    _require_int("iters", iters, 1)
    v = checked_center(center, x)
    v, _ = clip_iterations(x, normalized_weights(w, x.shape[0], x), v, tau=tau, iters=iters)
    return v


def checked_center(center: Tensor | None, x: Tensor) -> Tensor:
    """Centered clipping's starting v: the stored center (zeros if none), checked against x."""
    if center is None:
        return torch.zeros_like(x[0])
    if center.shape != x[0].shape:
        raise ValueError(
            f"centered clipping state v has shape {tuple(center.shape)}, deltas have "
            f"{tuple(x[0].shape)}"
        )
    return center.to(device=x.device, dtype=x.dtype)


def caf_weights(dists: Tensor, c: Tensor, *, num_byzantine: int) -> tuple[Tensor, float, int]:
    """CAF's filter on the n x n squared distances; returns (weights c*, lambda*, iters).

    The iterations of ``caf`` run on n x n matrices: with a = c / sum(c) and
    P = I - 1 a^T, the rows of P X are x_i - mu_c, so their Gram matrix is G = P K P^T
    for K the Gram matrix of the inputs shifted by any common vector (here: centred at
    one input, from the squared distances D alone). Sigma_c =
    (1/C) sum_i c_i (x_i - mu_c)(x_i - mu_c)^T has the non-zero eigenvalues of
    M = (1/C) diag(sqrt c) G diag(sqrt c); for M's top eigenpair (lambda, u) the top
    eigenvector of Sigma_c is v = X^T P^T diag(sqrt c) u / sqrt(C lambda), so the
    projections are (x_i - mu_c)^T v = (G diag(sqrt c) u)_i / sqrt(C lambda). Exact
    (LAPACK ``eigh``), no random start.

    Args:
        dists: [n, n] float64 squared distances (``pairwise_sq_dists``).
        c: [n] float64 initial weights, sum n (all ones without client weights).
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        (the weights c at the smallest lambda_max met, that lambda_max, iterations run).
    """
    n = dists.shape[0]
    f = num_byzantine
    dist = dists.to(torch.float64).cpu()
    c = c.to(torch.float64).cpu().clone()
    ones = torch.ones(n, dtype=torch.float64)
    # Gram matrix of the inputs centred at a reference input r: K_ij = (D_ir + D_jr -
    # D_ij) / 2. Any centring gives the same G; r = the input of smallest median
    # distance lies in the bulk, so once far inputs are filtered out G holds no trace
    # of their magnitude (a mean-centred K would mix it into every entry).
    r = int(torch.argmin(dist.median(dim=1).values))
    k = 0.5 * (dist[:, r : r + 1] + dist[r : r + 1, :] - dist)
    best_c, best_lam, iters = c.clone(), math.inf, 0
    # Each iteration zeroes the weight of at least one input (the one of largest
    # projection), so n iterations bound the loop; the relative slack absorbs rounding.
    while float(c.sum()) > (n - 2 * f) * (1 + 1e-12) and iters < n:
        iters += 1
        total = float(c.sum())
        proj_mat = torch.eye(n, dtype=torch.float64) - torch.outer(ones, c / total)
        g = proj_mat @ k @ proj_mat.T
        g = (g + g.T) * 0.5
        root = c.clamp_min(0.0).sqrt()
        evals, evecs = torch.linalg.eigh(root[:, None] * g * root[None, :] / total)
        lam = float(evals[-1])
        if lam < best_lam:
            best_c, best_lam = c.clone(), lam
        if lam <= 0.0:
            break  # the weighted inputs coincide: zero covariance, nothing to filter
        proj = (g @ (root * evecs[:, -1])) / math.sqrt(total * lam)
        tau = proj.square()
        tau_max = float(tau[c > 0].max())
        if tau_max <= 0.0:
            break
        c = (c * (1.0 - tau / tau_max)).clamp_min(0.0)
    return best_c, max(best_lam, 0.0), iters


def caf(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Covariance-bound agnostic filter: down-weight along the top eigenvector.

    Definition (Allouah, Guerraoui, Stephan 2025, the CAF aggregation of CafCor, as
    documented by LPD-EPFL/byzfl ``CAF``): start from c_i = 1 (with client weights,
    c_i = n w_i / sum_j w_j). While sum_i c_i > n - 2f:
    mu_c = sum_i c_i x_i / sum_i c_i; (lambda, v) = top eigenpair of
    Sigma_c = sum_i c_i (x_i - mu_c)(x_i - mu_c)^T / sum_i c_i;
    tau_i = ((x_i - mu_c)^T v)^2; c_i <- c_i (1 - tau_i / max_j tau_j).
    Return the mu_c of the iteration with the smallest lambda.

    Choices where the description leaves room: lambda and v are exact (the reference
    code runs one power iteration from a random vector; rules here draw no random
    numbers); max_j tau_j is taken over the inputs whose weight is still positive, so
    that every iteration zeroes one more input and at most 2f iterations run (the
    maximum over all inputs differs only when an input already filtered out projects
    furthest); f = 0 returns the (weighted) mean; a zero covariance stops the loop.
    Cost O(n^2 d + f n^3) (``caf_weights``).

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights (the initial c).
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        [d] aggregate.

    References:
        Allouah, Guerraoui, Stephan, "Towards Trustworthy Federated Learning with
        Untrusted Participants", ICML 2025 (CafCor; CAF is its aggregation rule), and
        the filter of Diakonikolas, Kamath, Kane, Li, Moitra, Stewart, "Being Robust (in
        High Dimensions) Can Be Practical", ICML 2017, without its covariance bound.
    """
    return caf_with_stats(x, weights, num_byzantine=num_byzantine)[0]


def caf_with_stats(
    x: Tensor, weights: Tensor | None, *, num_byzantine: int
) -> tuple[Tensor, float, int]:
    """(CAF aggregate, its lambda_max, iterations)."""
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("caf", n, f)
    c0 = normalized_weights(w, n, x).cpu() * n
    c, lam, iters = caf_weights(pairwise_sq_dists(x), c0, num_byzantine=f)
    return weighted_mean(x, c.to(x.device)), lam, iters
