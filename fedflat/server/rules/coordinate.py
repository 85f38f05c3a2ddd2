"""Coordinate-wise rules: median, trimmed mean, Meamed (ALGORITHMS.md §5.1).

Per-coordinate statistics use one sort along the client axis, over column blocks of
16384 coordinates on the CPU (one block on a GPU) that bound the temporaries; Python
never loops over single coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fedflat.server.rules.common import (
    _require_float,
    _require_int,
    _require_n,
    check_deltas,
    check_weights,
    drop_if_equal,
    mean,
    normalized_weights,
)

# Coordinates per block of the per-coordinate statistics (median, trimmed mean, Bulyan)
# on the CPU: a [16384, n] block and its sort indices stay within a few MB.
_COORD_BLOCK = 1 << 14


def by_blocks(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply a per-coordinate statistic to column blocks of x, transposed.

    ``fn`` maps a [C, n] block (one row per coordinate, clients along dim 1) to [C]. The
    blocks bound the temporaries (sort indices are int64, twice the size of float32
    values) and keep each selection within cache; every block is one vectorised call.
    On a GPU the whole matrix is one block.
    """
    d = x.shape[1]
    block = d if x.device.type != "cpu" else _COORD_BLOCK
    if block >= d:
        return fn(x.T.contiguous())
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    for start in range(0, d, block):
        out[start : start + block] = fn(x[:, start : start + block].T.contiguous())
    return out


def _numpy_sortable(b: Tensor) -> bool:
    return b.device.type == "cpu" and b.dtype in (torch.float32, torch.float64)


def _sorted_rows(b: Tensor) -> Tensor:
    """Each row of a contiguous [C, n] block sorted ascending.

    On the CPU numpy's vectorised sort is used: for float32/float64 rows of ~100 values
    it is about ten times faster than ``torch.sort`` (scripts/bench_rules.py).
    """
    if _numpy_sortable(b):
        return torch.from_numpy(np.sort(b.detach().numpy(), axis=1))
    return torch.sort(b, dim=1).values


def _argsorted_rows(b: Tensor) -> tuple[Tensor, Tensor]:
    """(sorted values, sorting permutation) of each row of a contiguous [C, n] block."""
    if _numpy_sortable(b):
        idx = torch.from_numpy(np.argsort(b.detach().numpy(), axis=1))
        return b.gather(1, idx), idx  # torch's gather is faster than take_along_axis
    vals, idx = torch.sort(b, dim=1)
    return vals, idx


def _take(alpha: Tensor, idx: Tensor) -> Tensor:
    """alpha[idx] for a [C, n] index block, as a broadcast gather (faster)."""
    return alpha.expand(idx.shape[0], alpha.shape[0]).gather(1, idx)


def _middle(vals: Tensor) -> Tensor:
    """Median of each sorted row: the middle value, or the mean of the two middles."""
    n = vals.shape[1]
    return (vals[:, (n - 1) // 2] + vals[:, n // 2]) * 0.5


def _median_rows(b: Tensor) -> Tensor:
    """Per row of a [C, n] block: the median, for even n the mean of the two middles."""
    return _middle(_sorted_rows(b))


def _weighted_median_rows(b: Tensor, alpha: Tensor) -> Tensor:
    """Per row of a [C, n] block: the weighted median, normalised weights alpha > 0."""
    n = b.shape[1]
    vals, idx = _argsorted_rows(b)
    cum = _take(alpha, idx).cumsum(dim=1)  # [C, n], increasing along dim 1
    # Slack for the rounding of a float cumulative sum, so that exact halves (uniform
    # weights, even n) are recognised as ties.
    slack = 4 * n * torch.finfo(b.dtype).eps
    k = (cum < 0.5 - slack).sum(dim=1, keepdim=True).clamp(max=n - 1)  # [C, 1]
    lower = vals.gather(1, k)
    tie = cum.gather(1, k) <= 0.5 + slack
    upper = vals.gather(1, (k + 1).clamp(max=n - 1))
    return torch.where(tie, (lower + upper) * 0.5, lower)[:, 0]


def _weighted_rows_mean(vals: Tensor, wk: Tensor) -> Tensor:
    """Per row: sum(wk * vals) / sum(wk); rows whose weights are all 0 take the mean."""
    den = wk.sum(dim=1)
    num = (wk * vals).sum(dim=1)
    tiny = torch.finfo(vals.dtype).tiny
    return torch.where(den > 0, num / den.clamp_min(tiny), vals.mean(dim=1))


def median(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """Coordinate-wise (weighted) median.

    Unweighted: per coordinate the middle value, for even n the mean of the two middle
    values (as epfml ``coordinatewise_median.py`` and ``numpy.median``). Weighted: per
    coordinate the smallest value whose cumulative normalised weight reaches 1/2; when
    it reaches exactly 1/2 the mean of that value and the next one, so integer weights
    give the median of the rows repeated w_i times and uniform weights give the
    unweighted median. Rows of weight zero are ignored.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights.

    Returns:
        [d] aggregate.

    References:
        Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
        Towards Optimal Statistical Rates", ICML 2018.
    """
    x = check_deltas(x)
    w = drop_if_equal(check_weights(weights, x.shape[0]))
    if w is None:
        return by_blocks(x, _median_rows)
    alpha = normalized_weights(w, x.shape[0], x)
    keep = alpha > 0
    if not bool(keep.all()):
        x, alpha = x[keep], alpha[keep]
    a = alpha.to(x.dtype)
    return by_blocks(x, lambda b: _weighted_median_rows(b, a))


def trimmed_mean(
    x: Tensor, weights: Tensor | None = None, *, trim_ratio: float
) -> Tensor:
    """Coordinate-wise trimmed mean.

    Per coordinate drop the b = floor(trim_ratio * n) largest and b smallest values and
    average the n - 2b others (weighted by the rows' weights if given; a coordinate
    whose kept rows all have weight zero falls back to their plain mean). The kept
    values are selected from a sort, not obtained by subtracting the trimmed ones from
    the total, so huge trimmed values cannot cost precision.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights.
        trim_ratio: beta in [0, 1/2).

    Returns:
        [d] aggregate.

    References:
        Yin, Chen, Ramchandran, Bartlett, ICML 2018 (beta-trimmed mean).
    """
    x = check_deltas(x)
    w = drop_if_equal(check_weights(weights, x.shape[0]))
    trim_ratio = _require_float(
        "trim_ratio", trim_ratio, low=0.0, strict=False, high=0.5
    )
    n = x.shape[0]
    # 1e-9 guards floor() against products such as 0.29 * 100 = 28.999999999999996.
    k = math.floor(trim_ratio * n + 1e-9)
    if k == 0:
        return mean(x, w)
    if w is None:
        return by_blocks(x, lambda b: _sorted_rows(b)[:, k : n - k].mean(1))
    a = normalized_weights(w, n, x).to(x.dtype)

    def rows(b: Tensor) -> Tensor:
        vals, idx = _argsorted_rows(b)
        return _weighted_rows_mean(vals[:, k : n - k], _take(a, idx[:, k : n - k]))

    return by_blocks(x, rows)


def meamed(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Mean around the median: per coordinate, the mean of the n - f values closest to
    the coordinate-wise median (weighted by the rows' weights if given).

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights.
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        [d] aggregate.

    References:
        Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD", 2018 (mean-around-
        median); ties in the distance to the median are broken arbitrarily.
    """
    x = check_deltas(x)
    w = drop_if_equal(check_weights(weights, x.shape[0]))
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("meamed", n, f)
    a = None if w is None else normalized_weights(w, n, x).to(x.dtype)
    return by_blocks(x, lambda b: closest_to_median_mean(b, n - f, a))


def closest_to_median_mean(b: Tensor, beta: int, a: Tensor | None) -> Tensor:
    """Per row of a [C, m] block: mean of the beta values closest to the row's median."""
    m = b.shape[1]
    if a is None:
        vals, idx = _sorted_rows(b), None
    else:
        vals, idx = _argsorted_rows(b)
    med = _middle(vals)[:, None]
    # In sorted order the beta values closest to the median are a contiguous window; it
    # is the window [l, l + beta) of smallest radius max(med - v_l, v_{l+beta-1} - med).
    radius = torch.maximum(med - vals[:, : m - beta + 1], vals[:, beta - 1 :] - med)
    window = radius.argmin(dim=1, keepdim=True) + torch.arange(beta, device=b.device)
    kept = vals.gather(1, window)
    if a is None or idx is None:
        return kept.mean(dim=1)
    return _weighted_rows_mean(kept, _take(a, idx.gather(1, window)))
