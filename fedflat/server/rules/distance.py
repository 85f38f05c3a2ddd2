"""Distance-based rules: Krum, Multi-Krum, Bulyan, MDA, MoNNA and NNM mixing.

All of them read one float64 matrix of pairwise squared distances
(``pairwise_sq_dists``, O(n^2 d)); selections then cost O(n^2) (Krum, MoNNA, NNM),
O(n^3) (Bulyan's n - 2f Krum rounds), O(C(n, f) (n - f)^2) (MDA's exact subset
enumeration) or O(C(n, f) (n - f)^3) (SMEA's, one eigenvalue problem per subset);
the two combinatorial rules refuse more subsets than their limit in
``fedflat.scenario.aggregation.RULE_SPECS``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from fedflat.scenario.aggregation import RULE_SPECS, subset_limit_message
from fedflat.server.rules.common import (
    _require_int,
    _require_n,
    check_deltas,
    check_weights,
    dists_to,
    drop_if_equal,
    normalized_weights,
    pairwise_sq_dists,
    weighted_mean,
)
from fedflat.server.rules.coordinate import by_blocks, closest_to_median_mean

KRUM_VARIANTS: tuple[str, ...] = ("paper", "epfml")

# Entries of the [chunk, m, m] blocks of the exact enumerations (MDA, SMEA): 2^22
# float64 entries (32 MB) per block, at most 4096 subsets per chunk.
_SUBSET_BLOCK = 1 << 22


def _require_subsets(rule: str, n: int, f: int) -> None:
    if RULE_SPECS[rule].too_many_subsets(n, f):
        raise ValueError(subset_limit_message(rule, n, f))


def _subset_chunks(n: int, m: int) -> Iterator[np.ndarray]:
    """All m-subsets of range(n) in lexicographic order, as [chunk, m] int64 arrays."""
    size = max(1, min(4096, _SUBSET_BLOCK // max(1, m * m)))
    combos = itertools.combinations(range(n), m)
    while True:
        chunk = np.array(list(itertools.islice(combos, size)), dtype=np.int64)
        if chunk.size == 0:
            return
        yield chunk.reshape(-1, m)


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
        x: [n, d] deltas.
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
    x = check_deltas(x)
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
        x: [n, d] deltas.
        num_byzantine: f, with n >= 2f + 3.
        variant: "paper" or "epfml".

    Returns:
        [d] the selected row (a copy).

    References:
        Blanchard et al., NeurIPS 2017.
    """
    return x[krum_select(x, num_byzantine=num_byzantine, variant=variant)[0]].clone()


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
        x: [n, d] deltas.
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
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    m = x.shape[0] - num_byzantine if num_selected is None else num_selected
    sel = krum_select(x, num_byzantine=num_byzantine, num_selected=m, variant=variant)
    if variant == "epfml":
        return x[sel].sum(dim=0)
    return weighted_mean(x[sel], None if w is None else w.to(x.device)[sel])


def bulyan_select(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Bulyan's selection: theta = n - 2f rounds of Krum, each removing its winner.

    One distance matrix serves all rounds. In a round with r candidates the score sums
    the min(max(r - f - 2, 1), r - 1) nearest other candidates (Krum's n - f - 2, kept
    >= 1 in the last rounds, where r falls to 2f + 1).

    Args:
        x: [n, d] deltas.
        num_byzantine: f, with n >= 4f + 3.

    Returns:
        [theta] int64 indices in the order selected.

    Raises:
        ValueError: n < 4f + 3.

    References:
        El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning
        in Byzantium", ICML 2018.
    """
    x = check_deltas(x)
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
        x: [n, d] deltas.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 4f + 3.

    Returns:
        [d] aggregate.

    References:
        El Mhamdi, Guerraoui, Rouault, ICML 2018 (definition as in ALGORITHMS.md §5.1;
        ties in the distance to the median are broken arbitrarily).
    """
    x = check_deltas(x)
    w = drop_if_equal(check_weights(weights, x.shape[0]))
    sel = bulyan_select(x, num_byzantine=num_byzantine)
    s = x[sel]  # [theta, d]
    theta = s.shape[0]
    beta = theta - 2 * num_byzantine
    a = None if w is None else normalized_weights(w, x.shape[0], x).to(x.dtype)[sel]

    return by_blocks(s, lambda blk: closest_to_median_mean(blk, beta, a))


def mda(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Minimum-diameter averaging: the mean of the n - f inputs of smallest diameter.

    Exact: all C(n, f) subsets of n - f rows are enumerated (vectorised in chunks) on
    one float64 distance matrix; the first subset of smallest diameter (max pairwise
    distance) in lexicographic order wins. Cost O(n^2 d + C(n, f) (n - f)^2); more than
    ``MAX_SUBSETS`` (``fedflat.scenario.aggregation``) subsets are refused.

    Args:
        x: [n, d] deltas.
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
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    sel = mda_select(x, num_byzantine=num_byzantine)
    return weighted_mean(x[sel], None if w is None else w.to(x.device)[sel])


def mda_select(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Indices (ascending) of MDA's minimum-diameter subset of n - f rows."""
    x = check_deltas(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("mda", n, f)
    _require_subsets("mda", n, f)
    dist = pairwise_sq_dists(x).cpu().numpy()
    best, best_diam = np.arange(n - f), math.inf
    for chunk in _subset_chunks(n, n - f):
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
        x: [n, d] deltas.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 2f + 1.
        trusted_index: row of the trusted input.

    Returns:
        [d] aggregate.

    References:
        Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan, "Robust Collaborative
        Learning with Linear Gradient Overhead", ICML 2023.
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("monna", n, f)
    t = _require_int("trusted_index", trusted_index, 0)
    if t >= n:
        raise ValueError(f"trusted_index must be < n = {n}, got {t}")
    dist = dists_to(x, x[t]).clone()
    dist[t] = -1.0  # the trusted input is always its own neighbour
    sel = torch.argsort(dist, stable=True)[: n - f]
    return weighted_mean(x[sel], None if w is None else w.to(x.device)[sel])


def nnm(x: Tensor, *, num_byzantine: int) -> Tensor:
    """Nearest-neighbour mixing: each input -> the mean of its n - f nearest inputs.

    Neighbours include the input itself (distance 0); ties go to the lower index.

    Args:
        x: [n, d] deltas.
        num_byzantine: f < n.

    Returns:
        [n, d] mixed inputs.

    References:
        Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan, "Fixing by Mixing: A
        Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023.
    """
    x = check_deltas(x)
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


def smea_select(x: Tensor, *, num_byzantine: int) -> tuple[Tensor, float]:
    """SMEA's subset: the n - f rows whose empirical covariance has the smallest top
    eigenvalue, and that eigenvalue.

    For a subset S of m = n - f rows, Sigma_S = (1/m) sum_{i in S} (x_i - mu_S)(x_i -
    mu_S)^T has the same non-zero eigenvalues as (1/m) G_S, where G_S = -1/2 J D_S J is
    the subset's centred Gram matrix (D_S its squared distances, J = I - 11^T/m). So
    every subset costs one m x m symmetric eigenvalue problem on the float64 distance
    matrix (exact, LAPACK), never a d x d one. Ties: the first subset in lexicographic
    order wins.

    Returns:
        ([n - f] ascending int64 row indices, lambda_max of their covariance).

    Raises:
        ValueError: n < 2f + 1, or C(n, f) (n - f)^3 > SMEA_MAX_WORK (names n and f).
    """
    x = check_deltas(x)
    n = x.shape[0]
    f = _require_int("num_byzantine", num_byzantine, 0)
    _require_n("smea", n, f)
    _require_subsets("smea", n, f)
    m = n - f
    dist = pairwise_sq_dists(x).cpu().numpy()
    centre = np.eye(m) - 1.0 / m
    best, best_lam = np.arange(m), math.inf
    for chunk in _subset_chunks(n, m):
        gram = -0.5 * (centre @ dist[chunk[:, :, None], chunk[:, None, :]] @ centre)
        lam = np.linalg.eigvalsh(gram)[:, -1] / m
        i = int(np.argmin(lam))
        if lam[i] < best_lam:
            best, best_lam = chunk[i], float(lam[i])
    return torch.from_numpy(best.copy()).to(x.device), max(best_lam, 0.0)


def smea(x: Tensor, weights: Tensor | None = None, *, num_byzantine: int) -> Tensor:
    """Smallest maximum eigenvalue averaging: the mean of the n - f inputs whose
    empirical covariance has the smallest largest eigenvalue.

    SMEA(x_1..x_n) = mean of S* = argmin_{|S| = n - f} lambda_max(Sigma_S), Sigma_S =
    (1/|S|) sum_{i in S} (x_i - mu_S)(x_i - mu_S)^T. Exact: all C(n, f) subsets are
    enumerated (``smea_select``; the reference code estimates lambda_max by one power
    iteration from a random vector, this computes it exactly). Cost O(n^2 d + C(n, f)
    (n - f)^3); configurations with C(n, f) (n - f)^3 > ``SMEA_MAX_WORK``
    (``fedflat.scenario.aggregation``; 20 000 subsets of 20) are refused with an error
    naming n and f. The selection ignores weights;
    the final average uses the selected rows' weights if given.

    Args:
        x: [n, d] deltas.
        weights: optional [n] non-negative weights for the final average.
        num_byzantine: f, with n >= 2f + 1.

    Returns:
        [d] aggregate.

    References:
        Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the Privacy-Robustness-Utility
        Trilemma in Distributed Learning", ICML 2023 (SMEA); LPD-EPFL/byzfl
        ``aggregators.SMEA``.
    """
    x = check_deltas(x)
    w = check_weights(weights, x.shape[0])
    sel, _ = smea_select(x, num_byzantine=num_byzantine)
    return weighted_mean(x[sel], None if w is None else w.to(x.device)[sel])
