"""Shared checks and building blocks of the aggregation rules.

Input validation (shapes, weights, parameter ranges), the NaN/Inf row filter, the
plain (weighted) mean, the float64 pairwise distances that the distance-based rules
share, and the rules' conditions on the number of inputs (read from the one table,
``fedflat.scenario.aggregation.RULE_SPECS``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from fedflat.scenario.aggregation import N_CONDITIONS, RULE_CONFIGS

# Columns per block when accumulating the float64 Gram matrix: bounds the temporary
# float64 copy to n * 65536 * 8 bytes (52 MB for n = 100).
_GRAM_BLOCK = 1 << 16

RuleState = dict[str, Tensor]


def _default(name: str) -> Any:
    """The scenario default of a rule parameter (from the rule config that declares it)."""
    cls = next(c for c in RULE_CONFIGS.values() if name in c.model_fields)
    return cls.model_fields[name].default


def _require_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _require_float(
    name: str, value: Any, *, low: float, strict: bool, high: float | None = None
) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
    ):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if (strict and value <= low) or (not strict and value < low):
        raise ValueError(
            f"{name} must be {'>' if strict else '>='} {low}, got {value!r}"
        )
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value!r}")
    return float(value)


def check_deltas(deltas: Tensor) -> Tensor:
    """The [n, d] stacked deltas unchanged, after checking shape, n >= 1 and dtype."""
    if not isinstance(deltas, Tensor) or deltas.dim() != 2:
        shape = tuple(deltas.shape) if isinstance(deltas, Tensor) else type(deltas)
        raise ValueError(f"deltas must be a 2-D tensor [n, d], got {shape}")
    if deltas.shape[0] < 1:
        raise ValueError("deltas must hold at least one row, got n = 0")
    if not deltas.is_floating_point():
        raise ValueError(f"deltas must be floating point, got {deltas.dtype}")
    return deltas


def check_weights(weights: Tensor | None, n: int) -> Tensor | None:
    """Validate raw weights; return them as float64 on their device (or None)."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).to(torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(
            f"weights must have one entry per delta (n = {n}), got {w.numel()}"
        )
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        raise ValueError(
            f"weights must be finite and >= 0, got {w[bad][:5].tolist()} at rows "
            f"{bad.nonzero()[:5, 0].tolist()}"
        )
    if float(w.sum()) <= 0.0:
        raise ValueError("weights must have a positive sum, got all zeros")
    return w


def drop_if_equal(w: Tensor | None) -> Tensor | None:
    """None for equal weights: the unweighted path gives the same statistic, faster."""
    if w is not None and bool((w == w[0]).all()):
        return None
    return w


def normalized_weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Normalised weights (sum 1), float64 on ``like``'s device; uniform if None."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)
    w = weights.to(device=like.device, dtype=torch.float64)
    return w / w.sum()


def sanitize(deltas: Tensor, d: int) -> tuple[Tensor, int]:
    """Find the rows that can be aggregated: right width, all entries finite.

    The RFA server rejects NaN/Inf deltas before aggregating (krishnap25/RFA
    ``models/server.py``); a single NaN row would otherwise poison every rule.

    Args:
        deltas: [n, d] stacked deltas.
        d: the expected number of parameters.

    Returns:
        (mask, num_rejected): a [n] bool mask of valid rows and the number rejected.

    Raises:
        ValueError: ``deltas`` is not [n, d].
    """
    if deltas.dim() != 2 or deltas.shape[1] != d:
        raise ValueError(
            f"deltas must have shape [n, {d}], got {tuple(deltas.shape)}"
        )
    mask = torch.isfinite(deltas).all(dim=1)
    return mask, int(deltas.shape[0] - int(mask.sum()))


def mean(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """(Weighted) mean of the rows: sum_i alpha_i x_i with alpha_i = w_i / sum_j w_j.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights (e.g. sample counts).

    Returns:
        [d] aggregate.

    References:
        McMahan et al., "Communication-Efficient Learning of Deep Networks from
        Decentralized Data", AISTATS 2017.
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    if w is None:
        return x.mean(dim=0)
    return normalized_weights(w, x.shape[0], x).to(x.dtype) @ x


def weighted_mean(x: Tensor, alpha: Tensor | None) -> Tensor:
    """Mean of rows weighted by an unnormalised alpha; uniform if its sum is 0."""
    if alpha is None or float(alpha.sum()) <= 0.0:
        return x.mean(dim=0)
    return (alpha / alpha.sum()).to(x.dtype) @ x


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """All squared Euclidean distances ||x_i - x_j||^2, never negative.

    One Gram matrix G = X X^T accumulated in float64 over column blocks (the blocks only
    bound the temporary float64 copy), then D = g_i + g_j - 2 G_ij clamped at 0 with an
    exactly zero diagonal. float64 keeps the cancellation in the expanded form harmless
    even when a few inputs are many orders of magnitude larger than the others.

    Args:
        x: [n, d] deltas.

    Returns:
        [n, n] float64 symmetric matrix.
    """
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    for start in range(0, d, _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK].to(torch.float64)
        gram.addmm_(block, block.T)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min_(0.0)
    dist = (dist + dist.T) * 0.5  # BLAS need not return an exactly symmetric Gram
    dist.fill_diagonal_(0.0)
    return dist


def dists_to(x: Tensor, z: Tensor) -> Tensor:
    """||x_i - z|| for every row, in float64, without an [n, d] temporary."""
    # The direct (non-Gram) cdist path: exact differences, no cancellation.
    d = torch.cdist(x, z[None].to(x.dtype), compute_mode="donot_use_mm_for_euclid_dist")
    d = d[:, 0].to(torch.float64)
    if x.dtype != torch.float64 and not bool(torch.isfinite(d).all()):
        # Huge finite inputs (e.g. 1e30 in float32) overflow the squares: redo those
        # rows in float64, by column blocks so that no [n, d] float64 copy is made.
        bad = (~torch.isfinite(d)).nonzero()[:, 0]
        acc = torch.zeros(bad.numel(), dtype=torch.float64, device=x.device)
        zz = z.to(torch.float64)
        for start in range(0, x.shape[1], _GRAM_BLOCK):
            blk = x[bad, start : start + _GRAM_BLOCK].to(torch.float64)
            acc += (blk - zz[start : start + _GRAM_BLOCK]).square().sum(dim=1)
        d[bad] = acc.sqrt()
    return d


def min_inputs(rule: str, params: Mapping[str, Any]) -> int:
    """Fewest rows (buckets, with bucketing) ``rule`` with resolved ``params`` accepts.

    Reads the one table of conditions, ``fedflat.scenario.aggregation.N_CONDITIONS``.
    """
    if rule not in N_CONDITIONS:
        return 1
    factor, offset = N_CONDITIONS[rule]
    return factor * int(params["num_byzantine"]) + offset


def _require_n(rule: str, n: int, f: int) -> None:
    need = min_inputs(rule, {"num_byzantine": f})
    if n < need:
        factor, offset = N_CONDITIONS[rule]
        raise ValueError(
            f"{rule} needs n >= {factor}*num_byzantine+{offset} = {need} inputs, "
            f"got n={n} with num_byzantine={f}"
        )
