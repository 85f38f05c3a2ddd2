"""Aggregation rules over a stacked ``[n, d]`` update matrix (ALGORITHMS.md §5.1).

Every rule is vectorised over the coordinates: per-coordinate statistics use one sort
along the client axis, distances come from one Gram matrix. Python loops run only over
iterations (Weiszfeld, centered clipping, Bulyan's n - 2f Krum rounds) and over large
column blocks (16384 coordinates for the per-coordinate statistics, 65536 for the Gram
accumulation) that bound temporary memory on the CPU, never over single coordinates.

Rules never draw random numbers themselves; bucketing permutes the inputs with the
``torch.Generator`` it is handed. Centered clipping keeps its previous output in the
rule state (``{"v": tensor}``); the other rules are stateless.

Two entry points:

* ``apply_rule(updates, weights, rule=..., params=..., state=..., gen=...)`` returns the
  aggregate, the new state and metrics; ``rule_step(...)`` wraps it as a server step.
* ``aggregate(updates, rule="median", **params)`` is the one-call convenience.

Parameter names are those of the scenario block ``server.aggregation``
(``fedflat.scenario.aggregation.AggregationConfig``), with the same defaults.
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.rng import stream
from fedflat.scenario.aggregation import (
    MAX_SUBSETS,
    N_CONDITIONS,
    NEEDS_NUM_BYZANTINE,
    PRE_NEEDS_NUM_BYZANTINE,
    RULE_PARAMETERS,
    AggregationConfig,
    PreName,
    mda_limit_message,
)
from fedflat.server.pipeline import Metrics, ServerRound, ServerStep

RULES: tuple[str, ...] = tuple(RULE_PARAMETERS)
WEIGHTINGS: tuple[str, ...] = ("samples", "uniform")
KRUM_VARIANTS: tuple[str, ...] = ("paper", "epfml")
PRE_AGGREGATORS: tuple[str, ...] = typing.get_args(PreName)

# Columns per block when accumulating the float64 Gram matrix: bounds the temporary
# float64 copy to n * 65536 * 8 bytes (52 MB for n = 100).
_GRAM_BLOCK = 1 << 16
# Coordinates per block of the per-coordinate statistics (median, trimmed mean, Bulyan)
# on the CPU: a [16384, n] block and its sort indices stay within a few MB.
_COORD_BLOCK = 1 << 14

RuleState = dict[str, Tensor]


# -------------------- checks


def _default(name: str) -> Any:
    return AggregationConfig.model_fields[name].default


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


def resolve_params(rule: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a rule's parameters and fill in the scenario defaults.

    Args:
        rule: one of ``RULES``.
        params: the rule's parameters (names as in ``server.aggregation``) and
            optionally ``bucket_size``. Parameters of other rules are refused.

    Returns:
        A new dict with every parameter of the rule plus ``bucket_size`` and ``pre``
        (the ordered pre-aggregators; ``bucket_size`` alone appends bucketing).

    Raises:
        ValueError: unknown rule, unknown parameter, missing ``num_byzantine`` or a
            value out of range (the message names the parameter, the bound and the
            value).
    """
    if rule not in RULE_PARAMETERS:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {list(RULES)}")
    pre = list(params.get("pre") or [])
    bad_pre = [q for q in pre if q not in PRE_AGGREGATORS]
    if bad_pre:
        raise ValueError(
            f"unknown pre-aggregators {bad_pre}; known: {list(PRE_AGGREGATORS)}"
        )
    allowed = (*RULE_PARAMETERS[rule], "bucket_size", "pre")
    if "clip" in pre:
        allowed = (*allowed, "clip_norm")
    needs_f = rule in NEEDS_NUM_BYZANTINE or any(
        q in PRE_NEEDS_NUM_BYZANTINE for q in pre
    )
    if needs_f and "num_byzantine" not in allowed:
        allowed = (*allowed, "num_byzantine")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"rule {rule!r} takes parameters {list(allowed)}, got unknown {unknown}"
        )
    p = {k: _default(k) for k in allowed if k != "pre"}
    p.update(params)
    if "bucketing" in pre and p["bucket_size"] is None:
        raise ValueError("pre-aggregator 'bucketing' needs bucket_size, got None")
    if p["bucket_size"] is not None and "bucketing" not in pre:
        pre.append("bucketing")  # the bucket_size key alone: bucketing right before the rule
    p["pre"] = pre
    if "clip" in pre:
        p["clip_norm"] = _require_float(
            "clip_norm", p.get("clip_norm"), low=0.0, strict=True
        )
    if "trusted_index" in p:
        _require_int("trusted_index", p["trusted_index"], 0)
    if needs_f:
        if p["num_byzantine"] is None:
            raise ValueError(
                f"rule {rule!r} needs num_byzantine (the assumed f), got None"
            )
        _require_int("num_byzantine", p["num_byzantine"], 0)
    if p.get("num_selected") is not None:
        _require_int("num_selected", p["num_selected"], 1)
    if "trim_ratio" in p:
        p["trim_ratio"] = _require_float(
            "trim_ratio", p["trim_ratio"], low=0.0, strict=False, high=0.5
        )
    if "nu" in p:
        p["nu"] = _require_float("nu", p["nu"], low=0.0, strict=True)
        _require_int("max_iters", p["max_iters"], 1)
        p["tol"] = _require_float("tol", p["tol"], low=0.0, strict=False)
        if p["init"] not in ("mean", "zero"):
            raise ValueError(f"init must be 'mean' or 'zero', got {p['init']!r}")
        if p["max_update_norm"] is not None:
            p["max_update_norm"] = _require_float(
                "max_update_norm", p["max_update_norm"], low=0.0, strict=True
            )
    if "krum_variant" in p and p["krum_variant"] not in KRUM_VARIANTS:
        raise ValueError(
            f"krum_variant must be one of {list(KRUM_VARIANTS)}, got {p['krum_variant']!r}"
        )
    if "tau" in p:
        p["tau"] = _require_float("tau", p["tau"], low=0.0, strict=True)
        _require_int("iters", p["iters"], 1)
    if p["bucket_size"] is not None:
        _require_int("bucket_size", p["bucket_size"], 1)
    return p


def _check_updates(updates: Tensor) -> Tensor:
    if not isinstance(updates, Tensor) or updates.dim() != 2:
        shape = tuple(updates.shape) if isinstance(updates, Tensor) else type(updates)
        raise ValueError(f"updates must be a 2-D tensor [n, d], got {shape}")
    if updates.shape[0] < 1:
        raise ValueError("updates must hold at least one row, got n = 0")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be floating point, got {updates.dtype}")
    return updates


def _check_weights(weights: Tensor | None, n: int) -> Tensor | None:
    """Validate raw weights; return them as float64 on their device (or None)."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).to(torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(
            f"weights must have one entry per update (n = {n}), got {w.numel()}"
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


def _drop_if_equal(w: Tensor | None) -> Tensor | None:
    """None for equal weights: the unweighted path gives the same statistic, faster."""
    if w is not None and bool((w == w[0]).all()):
        return None
    return w


def _alpha(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    """Normalised weights (sum 1), float64 on ``like``'s device; uniform if None."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)
    w = weights.to(device=like.device, dtype=torch.float64)
    return w / w.sum()


def sanitize(updates: Tensor, d: int) -> tuple[Tensor, int]:
    """Find the rows that can be aggregated: right width, all entries finite.

    The RFA server rejects NaN/Inf updates before aggregating (krishnap25/RFA
    ``models/server.py``); a single NaN row would otherwise poison every rule.

    Args:
        updates: [n, d] stacked updates.
        d: the expected number of parameters.

    Returns:
        (mask, num_rejected): a [n] bool mask of valid rows and the number rejected.

    Raises:
        ValueError: ``updates`` is not [n, d].
    """
    if updates.dim() != 2 or updates.shape[1] != d:
        raise ValueError(
            f"updates must have shape [n, {d}], got {tuple(updates.shape)}"
        )
    mask = torch.isfinite(updates).all(dim=1)
    return mask, int(updates.shape[0] - int(mask.sum()))


# -------------------- rules


def mean(x: Tensor, weights: Tensor | None = None) -> Tensor:
    """(Weighted) mean of the rows: sum_i alpha_i x_i with alpha_i = w_i / sum_j w_j.

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights (e.g. sample counts).

    Returns:
        [d] aggregate.

    References:
        McMahan et al., "Communication-Efficient Learning of Deep Networks from
        Decentralized Data", AISTATS 2017.
    """
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    if w is None:
        return x.mean(dim=0)
    return _alpha(w, x.shape[0], x).to(x.dtype) @ x


def _by_blocks(x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
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
        x: [n, d] updates.
        weights: optional [n] non-negative weights.

    Returns:
        [d] aggregate.

    References:
        Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning:
        Towards Optimal Statistical Rates", ICML 2018.
    """
    x = _check_updates(x)
    w = _drop_if_equal(_check_weights(weights, x.shape[0]))
    if w is None:
        return _by_blocks(x, _median_rows)
    alpha = _alpha(w, x.shape[0], x)
    keep = alpha > 0
    if not bool(keep.all()):
        x, alpha = x[keep], alpha[keep]
    a = alpha.to(x.dtype)
    return _by_blocks(x, lambda b: _weighted_median_rows(b, a))


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
        x: [n, d] updates.
        weights: optional [n] non-negative weights.
        trim_ratio: beta in [0, 1/2).

    Returns:
        [d] aggregate.

    References:
        Yin, Chen, Ramchandran, Bartlett, ICML 2018 (beta-trimmed mean).
    """
    x = _check_updates(x)
    w = _drop_if_equal(_check_weights(weights, x.shape[0]))
    trim_ratio = _require_float(
        "trim_ratio", trim_ratio, low=0.0, strict=False, high=0.5
    )
    n = x.shape[0]
    # 1e-9 guards floor() against products such as 0.29 * 100 = 28.999999999999996.
    k = math.floor(trim_ratio * n + 1e-9)
    if k == 0:
        return mean(x, w)
    if w is None:
        return _by_blocks(x, lambda b: _sorted_rows(b)[:, k : n - k].mean(1))
    a = _alpha(w, n, x).to(x.dtype)

    def rows(b: Tensor) -> Tensor:
        vals, idx = _argsorted_rows(b)
        return _weighted_rows_mean(vals[:, k : n - k], _take(a, idx[:, k : n - k]))

    return _by_blocks(x, rows)


def pairwise_sq_dists(x: Tensor) -> Tensor:
    """All squared Euclidean distances ||x_i - x_j||^2, never negative.

    One Gram matrix G = X X^T accumulated in float64 over column blocks (the blocks only
    bound the temporary float64 copy), then D = g_i + g_j - 2 G_ij clamped at 0 with an
    exactly zero diagonal. float64 keeps the cancellation in the expanded form harmless
    even when a few inputs are many orders of magnitude larger than the others.

    Args:
        x: [n, d] updates.

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


def krum_scores(dists: Tensor, *, num_byzantine: int, variant: str = "paper") -> Tensor:
    """Krum scores s_i = sum of the squared distances to the n - f - 2 nearest others.

    The nearest neighbours are the same in both variants; "epfml" sums the squares of
    the squared distances (its ``krum.py`` squares ``torch.norm(...) ** 2`` again).

    Args:
        dists: [n, n] squared distances (``pairwise_sq_dists``).
        num_byzantine: f, with n >= 2f + 3.
        variant: "paper" (squared distances) or "epfml" (distances to the 4th power).

    Returns:
        [n] scores (float64).

    Raises:
        ValueError: n < 2f + 3.
    """
    n = dists.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("krum", n, f)
    off = dists.clone()
    off.fill_diagonal_(math.inf)  # a point is not its own neighbour
    near = off.topk(n - f - 2, dim=1, largest=False).values
    if variant == "epfml":
        near = near.square()
    elif variant != "paper":
        raise ValueError(f"krum variant must be one of {list(KRUM_VARIANTS)}, got {variant!r}")
    return near.sum(dim=1)


def krum_select(
    x: Tensor, *, num_byzantine: int, num_selected: int = 1, variant: str = "paper"
) -> Tensor:
    """Indices of the ``num_selected`` lowest Krum scores, best first (ties: low index).

    Args:
        x: [n, d] updates.
        num_byzantine: f, with n >= 2f + 3.
        num_selected: m in [1, n].
        variant: Krum score, "paper" or "epfml" (``krum_scores``).

    Returns:
        [m] int64 indices into the rows of ``x``.

    Raises:
        ValueError: n < 2f + 3 or m out of range.

    References:
        Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
        Byzantine Tolerant Gradient Descent", NeurIPS 2017.
    """
    x = _check_updates(x)
    n = x.shape[0]
    _require_int("num_byzantine", num_byzantine, 0)
    _require_n("krum", n, num_byzantine)
    _require_int("num_selected", num_selected, 1)
    if num_selected > n:
        raise ValueError(f"num_selected must be <= n = {n}, got {num_selected}")
    scores = krum_scores(
        pairwise_sq_dists(x), num_byzantine=num_byzantine, variant=variant
    )
    return torch.argsort(scores, stable=True)[:num_selected]


def krum(x: Tensor, *, num_byzantine: int, variant: str = "paper") -> Tensor:
    """Krum: the input with the smallest Krum score (weights play no role).

    Scores use squared distances (Blanchard et al. 2017) by default; ``variant="epfml"``
    uses the squared-squared distances of the epfml code.

    Args:
        x: [n, d] updates.
        num_byzantine: f, with n >= 2f + 3.
        variant: "paper" or "epfml".

    Returns:
        [d] the selected row (a copy).

    References:
        Blanchard et al., NeurIPS 2017.
    """
    return x[krum_select(x, num_byzantine=num_byzantine, variant=variant)[0]].clone()


def _mean_of(x: Tensor, alpha: Tensor | None) -> Tensor:
    """Mean of rows weighted by an unnormalised alpha; uniform if its sum is 0."""
    if alpha is None or float(alpha.sum()) <= 0.0:
        return x.mean(dim=0)
    return (alpha / alpha.sum()).to(x.dtype) @ x


def multi_krum(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    num_byzantine: int,
    num_selected: int | None = None,
    variant: str = "paper",
) -> Tensor:
    """Multi-Krum: the mean of the m inputs with the lowest Krum scores.

    "paper": the mean of the selection, weighted by the selected rows' weights if given.
    "epfml": the epfml reference code, squared-squared distances in the scores and the
    unweighted *sum* of the selection. m = n - f by default; m = 1 is Krum.

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 2f + 3.
        num_selected: m in [1, n], default n - f.
        variant: "paper" or "epfml".

    Returns:
        [d] aggregate.

    References:
        Blanchard et al., NeurIPS 2017 (Multi-Krum, section 5); epfml/byzantine-robust-
        noniid-optimizer ``codes/aggregator/krum.py`` (variant "epfml").
    """
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    m = x.shape[0] - num_byzantine if num_selected is None else num_selected
    sel = krum_select(x, num_byzantine=num_byzantine, num_selected=m, variant=variant)
    if variant == "epfml":
        return x[sel].sum(dim=0)
    return _mean_of(x[sel], None if w is None else w.to(x.device)[sel])


def bulyan_select(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Bulyan's selection: theta = n - 2f rounds of Krum, each removing its winner.

    One distance matrix serves all rounds. In a round with r candidates the score sums
    the min(max(r - f - 2, 1), r - 1) nearest other candidates (Krum's n - f - 2, kept
    >= 1 in the last rounds, where r falls to 2f + 1).

    Args:
        x: [n, d] updates.
        num_byzantine: f, with n >= 4f + 3.

    Returns:
        [theta] int64 indices in the order selected.

    Raises:
        ValueError: n < 4f + 3.

    References:
        El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning
        in Byzantium", ICML 2018.
    """
    x = _check_updates(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("bulyan", n, f)
    dists = pairwise_sq_dists(x)
    remaining = torch.ones(n, dtype=torch.bool, device=x.device)
    chosen: list[Tensor] = []
    for _ in range(n - 2 * f):
        idx = remaining.nonzero()[:, 0]
        r = idx.numel()
        sub = dists[idx][:, idx]
        sub.fill_diagonal_(math.inf)
        k = min(max(r - f - 2, 1), r - 1)
        if k > 0:
            scores = sub.topk(k, dim=1, largest=False).values.sum(dim=1)
            winner = idx[torch.argmin(scores)]
        else:  # a single candidate is left
            winner = idx[0]
        chosen.append(winner)
        remaining[winner] = False
    return torch.stack(chosen)


def bulyan(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Bulyan: Krum-based selection, then a per-coordinate trimmed average.

    (1) theta = n - 2f inputs are selected by repeated Krum (``bulyan_select``). (2) Per
    coordinate, the beta = theta - 2f selected values closest to the selection's
    coordinate-wise median are averaged (weighted by the rows' weights if given).

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 4f + 3.

    Returns:
        [d] aggregate.

    References:
        El Mhamdi, Guerraoui, Rouault, ICML 2018 (definition as in ALGORITHMS.md §5.1;
        ties in the distance to the median are broken arbitrarily).
    """
    x = _check_updates(x)
    w = _drop_if_equal(_check_weights(weights, x.shape[0]))
    sel = bulyan_select(x, num_byzantine=num_byzantine)
    s = x[sel]  # [theta, d]
    theta = s.shape[0]
    beta = theta - 2 * num_byzantine
    a = None if w is None else _alpha(w, x.shape[0], x).to(x.dtype)[sel]

    offsets = torch.arange(beta, device=x.device)

    def rows(b: Tensor) -> Tensor:  # b: [C, theta]
        if a is None:
            vals, idx = _sorted_rows(b), None
        else:
            vals, idx = _argsorted_rows(b)
        med = _middle(vals)[:, None]
        # In sorted order the beta values closest to the median are a contiguous
        # window; it is the window [l, l + beta) of smallest radius
        # max(med - v_l, v_{l+beta-1} - med).
        radius = torch.maximum(
            med - vals[:, : theta - beta + 1], vals[:, beta - 1 :] - med
        )
        window = radius.argmin(dim=1, keepdim=True) + offsets  # [C, beta]
        kept = vals.gather(1, window)
        if a is None or idx is None:
            return kept.mean(dim=1)
        return _weighted_rows_mean(kept, _take(a, idx.gather(1, window)))

    return _by_blocks(s, rows)


def _dists_to(x: Tensor, z: Tensor) -> Tensor:
    """||x_i - z|| for every row, in float64, without an [n, d] temporary."""
    # The direct (non-Gram) cdist path: exact differences, no cancellation.
    d = torch.cdist(x, z[None].to(x.dtype), compute_mode="donot_use_mm_for_euclid_dist")
    return d[:, 0].to(torch.float64)


def _weiszfeld(
    x: Tensor, alpha: Tensor, *, nu: float, max_iters: int, tol: float, init: str
) -> tuple[Tensor, int, float]:
    """Smoothed Weiszfeld iterations; returns (z, iterations run, objective at z)."""
    z = alpha.to(x.dtype) @ x if init == "mean" else torch.zeros_like(x[0])
    dist = _dists_to(x, z)
    obj = float((alpha * dist).sum())
    iters = 0
    while iters < max_iters:
        iters += 1
        beta = alpha / dist.clamp_min(nu)
        z = (beta / beta.sum()).to(x.dtype) @ x
        dist = _dists_to(x, z)
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
        x: [n, d] updates.
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
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    p = resolve_params(
        "geometric_median", {"nu": nu, "max_iters": max_iters, "tol": tol, "init": init}
    )
    z, _, _ = _weiszfeld(
        x,
        _alpha(w, x.shape[0], x),
        nu=p["nu"],
        max_iters=p["max_iters"],
        tol=p["tol"],
        init=p["init"],
    )
    return z


def _clip_iterations(
    x: Tensor, alpha: Tensor, v: Tensor, *, tau: float, iters: int
) -> tuple[Tensor, float]:
    """Centered-clipping iterations; returns (v, fraction clipped in the last one)."""
    frac = 0.0
    for _ in range(iters):
        dist = _dists_to(x, v)
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
        x: [n, d] updates.
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
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    tau = _require_float("tau", tau, low=0.0, strict=True)
    _require_int("iters", iters, 1)
    v = _center(center, x)
    v, _ = _clip_iterations(x, _alpha(w, x.shape[0], x), v, tau=tau, iters=iters)
    return v


def _center(center: Tensor | None, x: Tensor) -> Tensor:
    if center is None:
        return torch.zeros_like(x[0])
    if center.shape != x[0].shape:
        raise ValueError(
            f"centered clipping state v has shape {tuple(center.shape)}, updates have "
            f"{tuple(x[0].shape)}"
        )
    return center.to(device=x.device, dtype=x.dtype)


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
        x: [n, d] updates.
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
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
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


# -------------------- minimum-diameter averaging, MoNNA, Meamed


def mda(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Minimum-diameter averaging: the mean of the n - f inputs of smallest diameter.

    Exact: all C(n, f) subsets of n - f rows are enumerated (vectorised in chunks) on
    one float64 distance matrix; the first subset of smallest diameter (max pairwise
    distance) in lexicographic order wins. Cost O(n^2 d + C(n, f) (n - f)^2); more than
    ``MAX_SUBSETS`` subsets are refused.

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        [d] aggregate.

    Raises:
        ValueError: n < 2f + 1, or C(n, f) > MAX_SUBSETS (the message names n and f).

    References:
        El Mhamdi, Guerraoui, Rouault, "Distributed Momentum for Byzantine-resilient
        Stochastic Gradient Descent", ICLR 2021 (MDA); Rousseeuw 1985 (MVE idea).
    """
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    sel = mda_select(x, num_byzantine=num_byzantine)
    return _mean_of(x[sel], None if w is None else w.to(x.device)[sel])


def mda_select(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Indices (ascending) of MDA's minimum-diameter subset of n - f rows."""
    x = _check_updates(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("mda", n, f)
    if math.comb(n, f) > MAX_SUBSETS:
        raise ValueError(mda_limit_message(n, f))
    dist = pairwise_sq_dists(x).cpu().numpy()
    best, best_diam = np.arange(n - f), math.inf
    combos = itertools.combinations(range(n), n - f)
    while True:
        chunk = np.array(list(itertools.islice(combos, 4096)), dtype=np.int64)
        if chunk.size == 0:
            break
        diam = dist[chunk[:, :, None], chunk[:, None, :]].max(axis=(1, 2))
        i = int(np.argmin(diam))
        if diam[i] < best_diam:
            best, best_diam = chunk[i], float(diam[i])
    return torch.from_numpy(best).to(x.device)


def monna(
    x: Tensor, weights: Tensor | None = None, *, num_byzantine: int, trusted_index: int = 0
) -> Tensor:
    """MoNNA: the mean of the n - f nearest neighbours of a trusted input (itself included).

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 2f + 1.
        trusted_index: row of the trusted input.

    Returns:
        [d] aggregate.

    References:
        Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative
        Learning with Linear Gradient Overhead", ICML 2023.
    """
    x = _check_updates(x)
    w = _check_weights(weights, x.shape[0])
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("monna", n, f)
    t = _require_int("trusted_index", trusted_index, 0)
    if t >= n:
        raise ValueError(f"trusted_index must be < n = {n}, got {t}")
    dist = _dists_to(x, x[t]).clone()
    dist[t] = -1.0  # the trusted input is always its own neighbour
    sel = torch.argsort(dist, stable=True)[: n - f]
    return _mean_of(x[sel], None if w is None else w.to(x.device)[sel])


def meamed(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Mean around the median: per coordinate, the mean of the n - f values closest to
    the coordinate-wise median (weighted by the rows' weights if given).

    Args:
        x: [n, d] updates.
        weights: optional [n] non-negative weights.
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        [d] aggregate.

    References:
        Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD", 2018 (mean-around-
        median); ties in the distance to the median are broken arbitrarily.
    """
    x = _check_updates(x)
    w = _drop_if_equal(_check_weights(weights, x.shape[0]))
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("meamed", n, f)
    a = None if w is None else _alpha(w, n, x).to(x.dtype)
    return _by_blocks(x, lambda b: _closest_to_median_mean(b, n - f, a))


def _closest_to_median_mean(b: Tensor, beta: int, a: Tensor | None) -> Tensor:
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


# -------------------- pre-aggregators (NNM, ARC, static clipping; bucketing above)


def nnm(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Nearest-neighbour mixing: each input -> the mean of its n - f nearest inputs.

    Neighbours include the input itself (distance 0); ties go to the lower index.

    Args:
        x: [n, d] updates.
        num_byzantine: f < n.

    Returns:
        [n, d] mixed inputs.

    References:
        Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A
        Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
    """
    x = _check_updates(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    if f >= n:
        raise ValueError(f"nnm needs num_byzantine < n, got n={n}, num_byzantine={f}")
    dist = pairwise_sq_dists(x)
    dist.fill_diagonal_(-1.0)  # itself first, whatever the duplicates
    near = torch.argsort(dist, dim=1, stable=True)[:, : n - f]  # [n, n - f]
    mix = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    mix.scatter_(1, near, 1.0 / (n - f))
    return mix.to(x.dtype) @ x


def _clip_rows(x: Tensor, threshold: float) -> tuple[Tensor, int]:
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    scale = (threshold / norms.clamp_min(torch.finfo(torch.float64).tiny)).clamp(max=1.0)
    return x * scale.to(x.dtype)[:, None], int((scale < 1.0).sum())


def arc_num_clipped(n: int, f: int) -> int:
    """ARC's k = floor(2 (f/n) (n - f)): the k largest-norm inputs are clipped."""
    return math.floor(2 * f * (n - f) / n + 1e-9)


def arc(x: Tensor, *, num_byzantine: int) -> tuple[Tensor, float]:
    """Adaptive robust clipping: clip every input to the (k+1)-th largest norm.

    k = floor(2 (f/n) (n - f)) (``arc_num_clipped``); with k = 0 nothing changes.

    Args:
        x: [n, d] updates.
        num_byzantine: f < n.

    Returns:
        ([n, d] clipped inputs, the threshold; inf when k = 0).

    References:
        Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "Adaptive Gradient Clipping
        for Robust Federated Learning" (ARC), 2024.
    """
    x = _check_updates(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    if f >= n:
        raise ValueError(f"arc needs num_byzantine < n, got n={n}, num_byzantine={f}")
    k = arc_num_clipped(n, f)
    if k == 0:
        return x, math.inf
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    threshold = float(torch.sort(norms, descending=True).values[k])
    return _clip_rows(x, threshold)[0], threshold


def clip(x: Tensor, *, clip_norm: float) -> Tensor:
    """Static clipping: every input scaled to L2 norm at most ``clip_norm``."""
    x = _check_updates(x)
    return _clip_rows(x, _require_float("clip_norm", clip_norm, low=0.0, strict=True))[0]


def _apply_pre(
    x: Tensor, w: Tensor | None, p: dict[str, Any], gen: torch.Generator | None
) -> tuple[Tensor, Tensor | None, Metrics]:
    """Run the ordered pre-aggregators of resolved params ``p``."""
    m: Metrics = {}
    for q in p["pre"]:
        if q == "nnm":
            before = x
            x = nnm(x, num_byzantine=p["num_byzantine"])
            m["agg/nnm_mean_shift"] = float(
                torch.linalg.vector_norm((x - before).to(torch.float64), dim=1).mean()
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


# -------------------- dispatch

_RuleOut = tuple[Tensor, RuleState, Metrics]
_RuleFn = Callable[[Tensor, Tensor | None, dict[str, Any], RuleState], _RuleOut]


def _r_mean(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return mean(x, w), dict(st), {}


def _r_median(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    return median(x, w), dict(st), {}


def _r_trimmed(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    b = math.floor(p["trim_ratio"] * x.shape[0] + 1e-9)
    agg = trimmed_mean(x, w, trim_ratio=p["trim_ratio"])
    return agg, dict(st), {"agg/num_trimmed": float(b)}


def _r_krum(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    idx = int(
        krum_select(x, num_byzantine=p["num_byzantine"], variant=p["krum_variant"])[0]
    )
    return x[idx].clone(), dict(st), {"agg/selected_index": float(idx)}


def _r_multi_krum(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    f = p["num_byzantine"]
    m = x.shape[0] - f if p["num_selected"] is None else p["num_selected"]
    agg = multi_krum(x, w, num_byzantine=f, num_selected=m, variant=p["krum_variant"])
    return agg, dict(st), {"agg/num_selected": float(m)}


def _r_bulyan(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    f = p["num_byzantine"]
    agg = bulyan(x, w, num_byzantine=f)
    theta = x.shape[0] - 2 * f
    return (
        agg,
        dict(st),
        {"agg/num_selected": float(theta), "agg/num_averaged": float(theta - 2 * f)},
    )


def _r_gm(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    z, iters, obj = _weiszfeld(
        x,
        _alpha(w, x.shape[0], x),
        nu=p["nu"],
        max_iters=p["max_iters"],
        tol=p["tol"],
        init=p["init"],
    )
    m = {"agg/gm_iters": float(iters), "agg/gm_objective": obj}
    cap = p["max_update_norm"]
    if cap is not None:
        # RFA's server guard (krishnap25/RFA models/server.py, MAX_UPDATE_NORM = 1000):
        # an aggregate that is too long is discarded and the round changes nothing.
        rejected = float(torch.linalg.vector_norm(z.to(torch.float64))) > cap
        m["agg/gm_rejected"] = float(rejected)
        if rejected:
            z = torch.zeros_like(z)
    return z, dict(st), m


def _r_cc(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    v0 = _center(st.get("v"), x)
    v, frac = _clip_iterations(
        x, _alpha(w, x.shape[0], x), v0, tau=p["tau"], iters=p["iters"]
    )
    shift = float(torch.linalg.vector_norm((v - v0).to(torch.float64)))
    new_state = {**st, "v": v.clone()}
    return v, new_state, {"agg/cc_frac_clipped": frac, "agg/cc_shift": shift}


def _r_mda(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return mda(x, w, num_byzantine=p["num_byzantine"]), dict(st), {}


def _r_monna(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    agg = monna(
        x, w, num_byzantine=p["num_byzantine"], trusted_index=p["trusted_index"]
    )
    return agg, dict(st), {}


def _r_meamed(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return meamed(x, w, num_byzantine=p["num_byzantine"]), dict(st), {}


_DISPATCH: dict[str, _RuleFn] = {
    "mean": _r_mean,
    "median": _r_median,
    "trimmed_mean": _r_trimmed,
    "krum": _r_krum,
    "multi_krum": _r_multi_krum,
    "bulyan": _r_bulyan,
    "geometric_median": _r_gm,
    "centered_clipping": _r_cc,
    "mda": _r_mda,
    "monna": _r_monna,
    "meamed": _r_meamed,
}


def apply_rule(
    updates: Tensor,
    weights: Tensor | None,
    *,
    rule: str,
    params: Mapping[str, Any],
    state: Mapping[str, Tensor] | None,
    gen: torch.Generator | None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
    """Aggregate a stacked update matrix with a named rule.

    Args:
        updates: [n, d] updates (already sanitised: every entry finite).
        weights: optional [n] non-negative weights (None = uniform).
        rule: one of ``RULES``.
        params: the rule's parameters (``server.aggregation`` names; missing ones take
            the scenario defaults) and optionally ``bucket_size`` to wrap the rule in
            bucketing.
        state: the rule state returned by the previous call (``{}`` or None at first).
        gen: generator for bucketing's permutation (unused otherwise).

    Returns:
        (aggregate [d], new state, metrics). Metrics: ``agg/num_buckets`` (bucketing),
        ``agg/selected_index`` (krum; an index into the rows, or into the buckets),
        ``agg/num_selected``, ``agg/num_averaged``, ``agg/num_trimmed``,
        ``agg/gm_iters``, ``agg/gm_objective``, ``agg/cc_frac_clipped``,
        ``agg/cc_shift``, ``agg/gm_rejected`` (geometric_median with max_update_norm).

    Raises:
        ValueError: bad rule/parameters/inputs, or too few inputs for the rule's
            condition (krum/multi_krum n >= 2f+3, bulyan n >= 4f+3; n = number of
            buckets with bucketing).
    """
    p = resolve_params(rule, params)
    x = _check_updates(updates)
    w = _check_weights(weights, x.shape[0])
    x, w, metrics = _apply_pre(x, w, p, gen)
    agg, new_state, m = _DISPATCH[rule](x, w, p, dict(state or {}))
    metrics.update(m)
    return agg, new_state, metrics


def aggregate(
    updates: Any,
    rule: str = "median",
    weights: Any = None,
    *,
    pre: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    gen: torch.Generator | None = None,
    state: Mapping[str, Tensor] | None = None,
    **params: Any,
) -> Tensor:
    """One-call aggregation: ``aggregate(x, "krum", pre=["nnm"], num_byzantine=2)``.

    Args:
        updates: [n, d] updates: a tensor, or a numpy array / nested list (converted
            with ``torch.as_tensor``; integers become float64).
        rule: one of ``RULES``.
        weights: optional [n] non-negative weights (tensor or array-like).
        pre: pre-aggregators applied in order (``PRE_AGGREGATORS``).
        seed: seeds the generator of bucketing's permutation when ``gen`` is None
            (``fedflat.rng.stream(seed, "server", 0)``), so calls are reproducible.
        gen: an explicit generator (overrides ``seed``).
        state: rule state (centered clipping's previous output ``{"v": ...}``).
        **params: the rule's parameters, named as in ``server.aggregation``.

    Returns:
        [d] aggregate (a tensor).
    """
    x = torch.as_tensor(updates)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    w = None if weights is None else torch.as_tensor(weights)
    if gen is None:
        gen = stream(seed, "server", 0)
    if pre:
        params = {**params, "pre": list(pre)}
    agg, _, _ = apply_rule(x, w, rule=rule, params=params, state=state, gen=gen)
    return agg


# -------------------- server step


def rule_step(
    rule: str, params: Mapping[str, Any], weighting: str = "samples"
) -> ServerStep:
    """Server step that aggregates ``round.deltas`` into ``round.aggregate``.

    Rows with NaN/Inf are dropped first (``sanitize``); the rule then sees the remaining
    rows with weights ``round.weights`` ("samples") or none ("uniform"). The step state
    is the rule state (centered clipping's v, zeros at the start). If every row is
    rejected, or fewer rows (buckets) remain than the rule's condition needs (krum
    n >= 2f+3, bulyan n >= 4f+3), the aggregate is the zero vector (the round changes
    nothing) and ``agg/num_rejected`` / ``agg/skipped`` say so.

    Args:
        rule: one of ``RULES``.
        params: the rule's parameters (``AggregationConfig.rule_params()``).
        weighting: "samples" or "uniform".

    Returns:
        A ``ServerStep`` named ``"aggregate"``. Its metrics: ``agg/num_rejected``,
        ``agg/num_inputs`` plus those of ``apply_rule``; for krum without bucketing also
        ``agg/selected_client`` (the client id).

    Raises:
        ValueError: bad rule, parameters or weighting (at construction).
    """
    resolved = resolve_params(rule, params)
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}"
        )

    def init(global_params: Tensor) -> RuleState:
        if rule == "centered_clipping":
            # v_0 = 0 (ALGORITHMS.md §5.1), kept across rounds.
            return {"v": torch.zeros_like(global_params)}
        return {}

    def apply(
        rnd: ServerRound, state: RuleState, gen: torch.Generator
    ) -> tuple[ServerRound, RuleState, Metrics]:
        d = rnd.params.numel()
        mask, num_rejected = sanitize(rnd.deltas, d)
        x = rnd.deltas[mask] if num_rejected else rnd.deltas
        metrics: Metrics = {
            "agg/num_rejected": float(num_rejected),
            "agg/num_inputs": float(x.shape[0]),
        }
        bucket = resolved["bucket_size"]
        n_eff = x.shape[0] if "bucketing" not in resolved["pre"] else -(-x.shape[0] // bucket)
        if n_eff < min_inputs(rule, resolved):
            # Poisson sampling, dropouts or rejected rows can leave fewer inputs than the
            # rule's condition: the round changes nothing and says so, the run goes on.
            metrics["agg/skipped"] = 1.0
            agg = torch.zeros(d, dtype=rnd.deltas.dtype, device=rnd.deltas.device)
            return rnd.with_(aggregate=agg), state, metrics
        w = None
        if weighting == "samples":
            w = rnd.weights[mask.to(rnd.weights.device)]
        agg, new_state, m = apply_rule(
            x, w, rule=rule, params=resolved, state=state, gen=gen
        )
        metrics.update(m)
        if "agg/selected_index" in m and "bucketing" not in resolved["pre"]:
            valid_ids = [
                c for c, ok in zip(rnd.client_ids, mask.tolist(), strict=True) if ok
            ]
            metrics["agg/selected_client"] = float(
                valid_ids[int(m["agg/selected_index"])]
            )
        return rnd.with_(aggregate=agg), new_state, metrics

    return ServerStep(name="aggregate", init=init, apply=apply)


__all__ = [
    "KRUM_VARIANTS",
    "PRE_AGGREGATORS",
    "RULES",
    "WEIGHTINGS",
    "aggregate",
    "apply_rule",
    "arc",
    "arc_num_clipped",
    "bucket_means",
    "bulyan",
    "bulyan_select",
    "centered_clipping",
    "clip",
    "geometric_median",
    "krum",
    "krum_scores",
    "krum_select",
    "mda",
    "mda_select",
    "meamed",
    "mean",
    "median",
    "min_inputs",
    "monna",
    "multi_krum",
    "nnm",
    "pairwise_sq_dists",
    "resolve_params",
    "rule_step",
    "sanitize",
    "trimmed_mean",
]
