"""Partitioners: split a labelled pool into client index arrays (ALGORITHMS.md §6).

Every partitioner is ``f(labels, num_clients, rng, *, options) -> list[np.ndarray]``:
``labels`` is the 1-D integer label array of the pool, the result holds one int64 index
array per client. Unless a docstring says otherwise
(``dirichlet_per_client(allow_reuse=True)``), every sample goes to exactly one client.
Create the generator with ``fedflat.rng.numpy_rng(seed, "partition")``.

The literature uses incompatible "α" conventions for Dirichlet label skew; the two
partitioners below name theirs explicitly (§6.1 per class across clients, §6.2 per
client over classes with ``alpha_scale``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

AlphaScale = Literal["total_mass", "per_coordinate"]


# ----------------------------------------------------------------------------------
# Partitioners


def iid(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Uniformly random split into parts whose sizes differ by at most one.

    Args:
        labels: ``[n]`` integer labels (only their count is used).
        num_clients: number of clients N, 1 <= N <= n.
        rng: source of randomness.

    Returns:
        N index arrays.

    References:
        McMahan et al., "Communication-Efficient Learning of Deep Networks from
        Decentralized Data", AISTATS 2017 (the IID baseline split).
    """
    y = _check_labels(labels)
    _check_clients(num_clients, len(y))
    return [np.sort(p) for p in np.array_split(rng.permutation(len(y)), num_clients)]


def dirichlet_per_class(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet label skew per class across clients (NIID-Bench ``noniid-labeldir``).

    For each class k: shuffle its indices, draw client proportions ``p ~ Dir(α·1_N)``,
    set ``p_j = 0`` for clients already holding ``>= n/N`` samples ("full"), renormalise
    and cut the class at ``⌊cumsum(p)·n_k⌋``. Repeat the whole draw until every client
    has at least ``min_size`` samples. Client sizes are unequal. A draw in which every
    non-full client got zero mass (underflow for tiny α) counts as a failed try.

    Args:
        labels: ``[n]`` integer labels.
        num_clients: number of clients N.
        rng: source of randomness.
        alpha: concentration per client, > 0 (NIID-Bench "beta"; 0.5 and 0.1 are
            common).
        min_size: smallest acceptable client (NIID-Bench ``min_require_size`` = 10).
        max_tries: give up with ``ValueError`` after this many draws.

    Returns:
        N index arrays, each shuffled.

    Raises:
        ValueError: bad arguments, or no draw met ``min_size`` within ``max_tries``.

    References:
        Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural
        Networks", ICML 2019; Li, Diao, Chen, He, "Federated Learning on Non-IID Data
        Silos: An Experimental Study" (NIID-Bench), ICDE 2022, ``utils.py
        partition_data``.
    """
    y = _check_labels(labels)
    n = len(y)
    _check_clients(num_clients, n)
    _check_positive("alpha", alpha)
    _check_int("min_size", min_size, 0)
    _check_int("max_tries", max_tries, 1)
    if min_size * num_clients > n:
        raise ValueError(
            f"dirichlet_per_class: min_size={min_size} x num_clients={num_clients} "
            f"exceeds the {n} samples"
        )
    pools = [np.flatnonzero(y == k) for k in np.unique(y)]
    full_at = n / num_clients
    for _ in range(max_tries):
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        counts = np.zeros(num_clients, dtype=np.int64)
        ok = True
        for pool in pools:
            idx = rng.permutation(pool)
            p = _dirichlet(rng, np.full(num_clients, float(alpha)))
            p = np.where(counts < full_at, p, 0.0)
            total = p.sum()
            if not total > 0:
                ok = False
                break
            cuts = (np.cumsum(p / total) * len(idx)).astype(np.int64)[:-1]
            for j, piece in enumerate(np.split(idx, cuts)):
                pieces[j].append(piece)
            counts += np.diff(np.concatenate(([0], cuts, [len(idx)])))
        if ok and counts.min() >= min_size:
            return [
                rng.permutation(np.concatenate(ps)).astype(np.int64) for ps in pieces
            ]
    raise ValueError(
        f"dirichlet_per_class: no partition with min_size={min_size} found in "
        f"max_tries={max_tries} draws (alpha={alpha}, num_clients={num_clients}, "
        f"n={n}); raise alpha, lower min_size or use fewer clients"
    )


def dirichlet_per_client(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float,
    alpha_scale: AlphaScale,
    size_sigma: float = 0.0,
    allow_reuse: bool = False,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Dirichlet label skew per client over classes (Hsu et al.; FedDyn; FL-Simulator).

    Each client i draws a class prior ``π_i`` and fills a quota ``q_i`` with labels
    drawn from it.

    * ``alpha_scale="total_mass"``: ``π_i ~ Dir(α·p)``, p uniform, i.e. concentration
      α/C per class (Hsu et al.; the FedSAM/Caldarola CIFAR splits, where α=0.5 gives
      ~3.4-3.6 classes per client on CIFAR-10 with 500 samples each).
    * ``alpha_scale="per_coordinate"``: ``π_i ~ Dir(α·1_C)`` (FL-Simulator, FedDyn,
      DP-FedSAM "Dir-0.6"; α=0.5 gives ~8.6-9 classes per client).
    * ``alpha=0``: the degenerate limit, exactly one class per client: classes are dealt
      to clients evenly in random order and each class is split evenly among its clients
      (needs ``num_clients >= C``; sizes follow the class sizes).

    Quotas are n/N (the remainder of the division goes one each to the first clients),
    or log-normal with ``size_sigma > 0``; both via :func:`quantity_sizes`.

    ``allow_reuse=False`` (default): clients are filled one after another in random
    order; each draws its class counts from ``π_i`` restricted to the classes that still
    have examples (uniform over them if ``π_i`` has no mass there), without replacement.
    Every sample goes to exactly one client. Filling client by client keeps late clients
    as skewed as early ones: on 10 balanced classes, 100 clients x 500, total_mass α =
    0.05/0.5/1/100 gives about 1.33/3.1/4.7/9.8 classes per client, close to the shipped
    FedSAM splits (1.32/3.57/4.78/9.90, ALGORITHMS.md §6.2). Interleaving the clients
    slot by slot (FedDyn without reuse) would instead spread each exhausted class's
    overflow over all clients (about 5.2 classes at α = 0.5).

    ``allow_reuse=True`` (FL-Simulator): slots are filled in random order, each draws a
    class from ``π_i`` and takes the next example of that class; an exhausted class pool
    starts over, so **samples are duplicated across clients** and others go unused. A
    ``UserWarning`` reports how many duplicates were made.

    Args:
        labels: ``[n]`` integer labels.
        num_clients: number of clients N.
        rng: source of randomness.
        alpha: Dirichlet concentration (>= 0), read as ``alpha_scale`` says.
        alpha_scale: ``"total_mass"`` or ``"per_coordinate"`` (no default: the two
            differ a lot and papers rarely say which they mean).
        size_sigma: σ of log-normal quotas; 0 = equal quotas.
        allow_reuse: reuse examples when a class pool runs out instead of falling back.
        num_classes: the dataset's number of classes C (for ``total_mass``'s α/C and the
            prior's length); None = the number of distinct labels. Classes absent from
            ``labels`` get prior mass but no examples, so clients fall back to others.

    Returns:
        N sorted index arrays.

    Raises:
        ValueError: bad arguments.

    References:
        Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
        Federated Visual Classification", 2019 (arXiv:1909.06335); Acar et al.,
        "Federated Learning Based on Dynamic Regularization" (FedDyn), ICLR 2021;
        woodenchild95/FL-Simulator ``dataset.py``; Caldarola et al., ECCV 2022 (FedSAM
        data).
    """
    y = _check_labels(labels)
    n = len(y)
    _check_clients(num_clients, n)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if alpha_scale not in ("total_mass", "per_coordinate"):
        raise ValueError(
            "alpha_scale must be 'total_mass' (Hsu et al.: Dir(alpha/C per class)) or "
            "'per_coordinate' (FL-Simulator: Dir(alpha per class)), "
            f"got {alpha_scale!r}"
        )
    present = np.unique(y)
    if num_classes is None:
        num_classes = len(present)
    elif not isinstance(num_classes, (int, np.integer)) or num_classes <= present[-1]:
        raise ValueError(
            f"num_classes must exceed the largest label {present[-1]}, "
            f"got {num_classes!r}"
        )
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in present]

    if alpha == 0:
        return _one_class_each(rng, pools, num_clients, size_sigma)
    conc = alpha / num_classes if alpha_scale == "total_mass" else float(alpha)
    full = _dirichlet(rng, np.full(num_classes, conc), size=num_clients)  # [N, C]
    if len(present) == num_classes:
        priors = full
    else:
        # Keep the mass on the classes that have examples; a client whose prior sat
        # entirely on absent classes draws uniformly from the present ones.
        priors = full[:, present]
        empty = priors.sum(axis=1) <= 0
        priors[empty] = 1.0
    quotas = quantity_sizes(n, num_clients, rng, sigma=size_sigma, min_size=1)
    if allow_reuse:
        return _fill_with_reuse(rng, priors, quotas, pools)
    return _fill_without_reuse(rng, priors, quotas, pools)


def _one_class_each(
    rng: np.random.Generator,
    pools: list[np.ndarray],
    num_clients: int,
    size_sigma: float,
) -> list[np.ndarray]:
    """The α -> 0 limit: one class per client, classes spread evenly over clients."""
    num_classes = len(pools)
    if num_clients < num_classes:
        raise ValueError(
            "alpha=0 gives one class per client and needs "
            f"num_clients >= {num_classes} "
            f"(the number of classes) so that every sample is used, got {num_clients}"
        )
    if size_sigma != 0:
        raise ValueError(
            "alpha=0 takes client sizes from the class sizes; size_sigma must be 0, "
            f"got {size_sigma}"
        )
    # Balanced class assignment in random order; each class's pool is split evenly among
    # its holders (the same as NIID-Bench's #label1).
    owner_class = rng.permutation(np.arange(num_clients) % num_classes)
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for c in range(num_classes):
        holders = np.flatnonzero(owner_class == c)
        if len(pools[c]) < len(holders):
            raise ValueError(
                f"alpha=0: class {c} has {len(pools[c])} samples for "
                f"{len(holders)} clients"
            )
        for i, piece in zip(
            holders, np.array_split(pools[c], len(holders)), strict=True
        ):
            parts[i] = np.sort(piece)
    return parts


def _fill_with_reuse(
    rng: np.random.Generator,
    priors: np.ndarray,
    quotas: np.ndarray,
    pools: list[np.ndarray],
) -> list[np.ndarray]:
    """FL-Simulator: slots filled in random order, an exhausted class pool restarts."""
    num_clients, num_classes = priors.shape
    pool_size = np.array([len(p) for p in pools], dtype=np.int64)
    slot_client = rng.permutation(np.repeat(np.arange(num_clients), quotas))  # [n]
    cls = _draw_classes(rng, priors[slot_client])  # [n] one class per slot
    rank = _occurrence_rank(cls, num_classes)  # k-th draw of its class
    source = rank % pool_size[cls]  # the pool starts over when it runs out
    duplicates = int(
        np.maximum(np.bincount(cls, minlength=num_classes) - pool_size, 0).sum()
    )
    if duplicates:
        warnings.warn(
            f"dirichlet_per_client(allow_reuse=True) duplicated {duplicates} samples "
            "across clients (exhausted class pools were reused)",
            UserWarning,
            stacklevel=3,
        )
    sample = np.empty(len(cls), dtype=np.int64)
    # Map (class, rank) -> example index, one class at a time.
    for c in range(num_classes):
        hit = cls == c
        sample[hit] = pools[c][source[hit]]
    order = np.argsort(slot_client, kind="stable")
    return [np.sort(p) for p in np.split(sample[order], np.cumsum(quotas)[:-1])]


def _fill_without_reuse(
    rng: np.random.Generator,
    priors: np.ndarray,
    quotas: np.ndarray,
    pools: list[np.ndarray],
) -> list[np.ndarray]:
    """Fill clients one by one, without replacement.

    Clients in random order each draw their class counts from their prior restricted to
    classes with examples left; a draw beyond a class's remaining examples is redrawn.
    """
    num_clients, num_classes = priors.shape
    left = np.array([len(p) for p in pools], dtype=np.int64)
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    order = rng.permutation(num_clients)
    for i in order:
        need = int(quotas[i])
        while need > 0:  # each pass either fills the client or exhausts a class
            available = left > 0
            p = priors[i] * available
            if not p.sum() > 0:
                p = available.astype(np.float64)  # no prior mass left: uniform fallback
            take = np.minimum(rng.multinomial(need, p / p.sum()), left)
            counts[i] += take
            left -= take
            need -= int(take.sum())
    # Class c's shuffled pool is consumed in client order: client order[j] takes the
    # slice after everything earlier clients took. Built with one sort over all samples
    # (a slice per client and class cost N·C Python steps: seconds at 10⁵ clients).
    owner = np.concatenate([np.repeat(order, counts[order, c]) for c in range(num_classes)])
    sample = np.concatenate([pools[c][: counts[:, c].sum()] for c in range(num_classes)])
    ranked = sample[np.lexsort((sample, owner))]  # by client, each client's samples sorted
    return np.split(ranked, np.cumsum(counts.sum(axis=1))[:-1])


def shards(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Pathological label skew: sort by label, give each client k of ``N·k`` shards.

    Ties within a class are broken at random. Shards are equal up to one sample
    (``np.array_split``) so that no sample is dropped; a shard crosses a class boundary
    when class sizes are not multiples of the shard size, so a client can then see more
    than k classes.

    Args:
        labels: ``[n]`` integer labels.
        num_clients: number of clients N.
        rng: source of randomness.
        shards_per_client: k (MNIST in McMahan et al.: 200 shards of 300, k = 2).

    Returns:
        N index arrays.

    References:
        McMahan et al., "Communication-Efficient Learning of Deep Networks from
        Decentralized Data", AISTATS 2017, Sec. 3.
    """
    y = _check_labels(labels)
    _check_int("shards_per_client", shards_per_client, 1)
    _check_clients(
        num_clients * shards_per_client, len(y), what="num_clients*shards_per_client"
    )
    _check_clients(num_clients, len(y))
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_clients * shards_per_client)
    owner = rng.permutation(num_clients * shards_per_client).reshape(
        num_clients, shards_per_client
    )
    return [np.sort(np.concatenate([pieces[s] for s in row])) for row in owner]


def quantity_sizes(
    n: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    sigma: float,
    min_size: int = 1,
    max_tries: int = 1000,
) -> np.ndarray:
    """Client sizes ``s_i ~ LogNormal(log(n/N), σ)`` rescaled to sum to n (§6.4).

    Sizes are floored after rescaling (FL-Simulator / FedDyn ``unbalanced_sgm``); the
    rounding remainder r < N goes one sample each to clients 0..r-1 (the reference code
    gives it all to one client; spreading it keeps ``sigma=0`` balanced to within one
    sample). Draws are repeated until every client has at least ``min_size`` samples.

    Args:
        n: total number of samples.
        num_clients: number of clients N.
        rng: source of randomness.
        sigma: log-normal σ (>= 0).
        min_size: smallest acceptable client.
        max_tries: give up with ``ValueError`` after this many draws.

    Returns:
        int64 ``[N]`` summing to n.

    Raises:
        ValueError: bad arguments or ``min_size`` unreachable.
    """
    _check_clients(num_clients, n)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    _check_int("min_size", min_size, 0)
    _check_int("max_tries", max_tries, 1)
    if min_size * num_clients > n:
        raise ValueError(
            f"quantity skew: min_size={min_size} x num_clients={num_clients} "
            f"exceeds n={n}"
        )
    for _ in range(max_tries):
        # Draw in log space, normalise by the max: exp(big) overflows for large sigma.
        log_s = sigma * rng.standard_normal(num_clients)
        s = np.exp(log_s - log_s.max())
        sizes = np.floor(s / s.sum() * n).astype(np.int64)
        remainder = n - int(sizes.sum())
        if remainder >= 0:
            sizes[:remainder] += 1
        else:  # a float round-up of a near-integer share: take it back from the largest
            sizes[np.argmax(sizes)] += remainder
        if sizes.min() >= min_size:
            return sizes
    raise ValueError(
        f"quantity skew: no draw gave every client >= {min_size} samples in "
        f"max_tries={max_tries} draws (sigma={sigma}, num_clients={num_clients}, "
        f"n={n}); lower sigma or min_size"
    )


def quantity_skew(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    sigma: float,
    min_size: int = 1,
) -> list[np.ndarray]:
    """IID labels with log-normal client sizes (:func:`quantity_sizes`), §6.4.

    Args:
        labels: ``[n]`` integer labels (only their count is used).
        num_clients: number of clients N.
        rng: source of randomness.
        sigma: log-normal σ of the sizes; 0 = balanced.
        min_size: smallest acceptable client.

    Returns:
        N index arrays whose sizes sum to n.

    References:
        Acar et al., FedDyn, ICLR 2021 (unbalanced log-normal sizes); Li et al.,
        NIID-Bench, ICDE 2022 (quantity skew).
    """
    y = _check_labels(labels)
    sizes = quantity_sizes(len(y), num_clients, rng, sigma=sigma, min_size=min_size)
    perm = rng.permutation(len(y))
    return [np.sort(p) for p in np.split(perm, np.cumsum(sizes)[:-1])]


def natural(
    groups: Sequence[np.ndarray], *, num_samples: int | None = None
) -> list[np.ndarray]:
    """Natural clients given by the dataset (FEMNIST writers, synthetic devices).

    Args:
        groups: one index array per client.
        num_samples: if given, indices must lie in ``[0, num_samples)``.

    Returns:
        The groups as int64 arrays (copies).

    Raises:
        ValueError: an empty group, an index out of range, or a sample in two groups.
    """
    out = [np.asarray(g, dtype=np.int64).copy() for g in groups]
    if not out:
        raise ValueError("natural: no groups given")
    for i, g in enumerate(out):
        if g.ndim != 1 or len(g) == 0:
            raise ValueError(f"natural: group {i} must be a non-empty 1-D index array")
    flat = np.concatenate(out)
    if flat.min() < 0 or (num_samples is not None and flat.max() >= num_samples):
        raise ValueError(
            f"natural: indices must lie in [0, {num_samples}), "
            f"got {flat.min()}..{flat.max()}"
        )
    if len(np.unique(flat)) != len(flat):
        raise ValueError("natural: a sample appears in more than one group")
    return out


# ----------------------------------------------------------------------------------
# Registry and statistics

PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet_per_class": dirichlet_per_class,
    "dirichlet_per_client": dirichlet_per_client,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def make_partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    num_classes: int | None = None,
    **options: Any,
) -> list[np.ndarray]:
    """Run the partitioner ``name`` with keyword ``options``, checking the option names.

    The one dispatch of partitioner names (the run's data builder calls it with the
    ``data.partition`` block). ``num_classes`` (the dataset's C) reaches the partitioners
    that take it. ``natural`` is not in the registry: it needs the dataset's groups; call
    :func:`natural`.

    Raises:
        ValueError: unknown partitioner, unknown option or missing required option.
    """
    try:
        fn = PARTITIONERS[name]
    except KeyError:
        raise ValueError(
            f"unknown partitioner {name!r}; known: {sorted(PARTITIONERS)} "
            "(and 'natural')"
        ) from None
    params = {
        p.name: p
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(
            f"partitioner {name!r}: unknown option(s) {unknown}; "
            f"allowed: {sorted(params)}"
        )
    missing = sorted(
        k for k, p in params.items() if p.default is p.empty and k not in options
    )
    if missing:
        raise ValueError(f"partitioner {name!r}: missing required option(s) {missing}")
    if "num_classes" in params:
        options = {**options, "num_classes": num_classes}
    return fn(labels, num_clients, rng, **options)


def client_stats(
    parts: Sequence[np.ndarray], labels: np.ndarray, num_classes: int
) -> list[dict[str, Any]]:
    """Per-client size and class histogram, for the run folder.

    Args:
        parts: client index arrays.
        labels: ``[n]`` integer labels the indices refer to.
        num_classes: histogram length.

    Returns:
        One dict per client: ``client`` (id), ``num_samples``, ``num_classes_present``
        and ``class_counts`` (list of ``num_classes`` ints).
    """
    y = np.asarray(labels)
    out = []
    for i, p in enumerate(parts):
        counts = np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
        out.append(
            {
                "client": i,
                "num_samples": len(p),
                "num_classes_present": int((counts > 0).sum()),
                "class_counts": [int(c) for c in counts],
            }
        )
    return out


# ----------------------------------------------------------------------------------
# Helpers


def _dirichlet(
    rng: np.random.Generator, conc: np.ndarray, size: int | None = None
) -> np.ndarray:
    """Dirichlet draws that stay valid for tiny concentrations.

    Gamma(a) variates for a << 1 underflow to 0, making ``g / g.sum()`` NaN. We sample
    ``log G(a) = log G(a + 1) + log(U) / a`` (Marsaglia & Tsang's boosting identity) and
    normalise with a log-sum-exp, which is exact in distribution for every a > 0.
    """
    shape = conc.shape if size is None else (size, *conc.shape)
    log_g = np.log(rng.gamma(conc + 1.0, size=shape)) + np.log(rng.random(shape)) / conc
    log_g -= log_g.max(axis=-1, keepdims=True)
    g = np.exp(log_g)
    return g / g.sum(axis=-1, keepdims=True)


def _draw_classes(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of non-negative (unnormalised) ``probs [m, C]``."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(probs)) * cdf[:, -1]
    # Count of cdf entries <= u; clip guards u == total for floating-point ties.
    return np.minimum((cdf <= u[:, None]).sum(axis=1), probs.shape[1] - 1)


def _occurrence_rank(cls: np.ndarray, num_classes: int) -> np.ndarray:
    """For each position, how many earlier positions hold the same class."""
    order = np.argsort(cls, kind="stable")
    counts = np.bincount(cls, minlength=num_classes)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(len(cls), dtype=np.int64)
    rank[order] = np.arange(len(cls)) - starts[cls[order]]
    return rank


def _check_labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got min {y.min()}")
    return y.astype(np.int64, copy=False)


def _check_clients(num_clients: int, n: int, what: str = "num_clients") -> None:
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool):
        raise ValueError(f"{what} must be an integer, got {num_clients!r}")
    if not 1 <= num_clients <= n:
        raise ValueError(
            f"{what} must be in [1, {n}] (the number of samples), got {num_clients}"
        )


def _check_int(name: str, value: int, low: int) -> None:
    if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or value < low
    ):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
