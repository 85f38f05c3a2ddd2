"""Pre-aggregators, applied in order before any rule: NNM, ARC, static clipping, bucketing.

``apply_pre`` runs the list ``server.aggregation.pre`` and reports each step's state
(NNM's mean shift, ARC's threshold and count, the number clipped, the bucket count).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fedflat.server.pipeline import Metrics
from fedflat.server.rules.common import (
    _require_float,
    _require_int,
    check_deltas,
    check_weights,
)
from fedflat.server.rules.distance import nnm


def bucket_means(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    bucket_size: int,
    gen: torch.Generator | None,
) -> tuple[Tensor, Tensor | None]:
    """Bucketing: permute the rows, split into ceil(n/s) buckets, average each bucket.

    Buckets are consecutive runs of ``bucket_size`` rows of a random permutation (the
    last may be smaller). With weights, each bucket is the weighted mean of its rows
    (uniform if all its weights are 0) and carries the sum of their weights, so
    bucketing followed by the weighted mean is the weighted mean.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights.
        bucket_size: s >= 1.
        gen: generator for the permutation (required).

    Returns:
        ([ceil(n/s), d] bucket means, [ceil(n/s)] bucket weights or None).

    Raises:
        ValueError: no generator, or a bad bucket_size.

    References:
        Karimireddy, He, Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
        Bucketing", ICLR 2022.
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    s = _require_int("bucket_size", bucket_size, 1)
    if gen is None:
        raise ValueError(
            "bucketing needs a torch.Generator for its permutation, got None"
        )
    n = x.shape[0]
    nb = math.ceil(n / s)
    perm = torch.randperm(n, generator=gen, device=gen.device).to(x.device)
    bucket_of = torch.empty(n, dtype=torch.long, device=x.device)
    bucket_of[perm] = torch.arange(n, device=x.device) // s
    raw = (
        torch.ones(n, dtype=torch.float64, device=x.device)
        if w is None
        else w.to(x.device)
    )
    member = torch.zeros(nb, n, dtype=torch.float64, device=x.device)
    member[bucket_of, torch.arange(n, device=x.device)] = 1.0
    mat = member * raw[None, :]
    totals = mat.sum(dim=1)
    # A bucket whose members all weigh 0 averages them uniformly (and keeps weight 0).
    mat = torch.where(totals[:, None] > 0, mat, member)
    mat = mat / mat.sum(dim=1, keepdim=True)
    means = mat.to(x.dtype) @ x
    return means, (None if w is None else totals)


def _row_norms(x: Tensor) -> Tensor:
    """L2 norm of every row, accumulated in float64 (``dtype=``: the same numbers as
    norms of a float64 copy, faster, scripts/bench_rules.py)."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)


def _clip_rows(x: Tensor, threshold: float) -> tuple[Tensor, int]:
    norms = _row_norms(x)
    scale = (threshold / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
    return x * scale.to(x.dtype)[:, None], int((scale < 1.0).sum())


def arc_num_clipped(n: int, f: int) -> int:
    """ARC's k = floor(2 (f/n) (n - f)): the k largest-norm inputs are clipped."""
    return math.floor(2 * f * (n - f) / n + 1e-9)


def arc(x: Tensor, *, num_byzantine: int) -> tuple[Tensor, float]:
    """Adaptive robust clipping: clip every input to the (k+1)-th largest norm.

    k = floor(2 (f/n) (n - f)) (``arc_num_clipped``); with k = 0 nothing changes.

    Args:
        x: [n, d] deltas.
        num_byzantine: f < n.

    Returns:
        ([n, d] clipped inputs, the threshold; inf when k = 0).

    References:
        Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive Gradient Clipping
        for Robust Federated Learning" (ARC), 2024.
    """
    x = check_deltas(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    if f >= n:
        raise ValueError(f"arc needs num_byzantine < n, got n={n}, num_byzantine={f}")
    k = arc_num_clipped(n, f)
    if k == 0:
        return x, math.inf
    norms = _row_norms(x)
    threshold = float(torch.sort(norms, descending=True).values[k])
    return _clip_rows(x, threshold)[0], threshold


def clip(x: Tensor, *, clip_norm: float) -> Tensor:
    """Static clipping: every input scaled to L2 norm at most ``clip_norm``."""
    x = check_deltas(x)
    return _clip_rows(x, _require_float("clip_norm", clip_norm, low=0.0, strict=True))[0]


def apply_pre(
    x: Tensor, w: Tensor | None, p: dict[str, Any], gen: torch.Generator | None
) -> tuple[Tensor, Tensor | None, Metrics]:
    """Run the ordered pre-aggregators of resolved params ``p``."""
    m: Metrics = {}
    for q in p["pre"]:
        if q == "nnm":
            before = x
            x = nnm(x, num_byzantine=p["num_byzantine"])
            m["agg/nnm_mean_shift"] = float(
                _row_norms(x - before).mean()
            )
        elif q == "arc":
            x, thr = arc(x, num_byzantine=p["num_byzantine"])
            m["agg/arc_threshold"] = thr
            m["agg/arc_num_clipped"] = float(
                arc_num_clipped(x.shape[0], p["num_byzantine"])
            )
        elif q == "clip":
            x, num = _clip_rows(x, p["clip_norm"])
            m["agg/clip_num_clipped"] = float(num)
        else:  # bucketing
            x, w = bucket_means(x, w, bucket_size=p["bucket_size"], gen=gen)
            m["agg/num_buckets"] = float(x.shape[0])
    return x, w, m
