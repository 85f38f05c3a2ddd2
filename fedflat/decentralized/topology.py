"""Communication graphs and mixing matrices for decentralized (gossip) training.

A graph is a symmetric 0/1 adjacency matrix ``A`` ([n, n] bool numpy array, no self
loops). A mixing matrix ``W`` is symmetric, non-negative, doubly stochastic
(``W 1 = 1``, ``1ᵀ W = 1ᵀ``) and supported on the graph plus the diagonal; one gossip step
is ``X ← W X`` (rows = nodes).

Graphs (``n`` nodes, node ids 0..n-1):
    ring: i ~ i ± 1 (mod n); n ≥ 3.
    torus: a rows × cols 2-D torus (node r·cols + c ~ its 4 neighbours with wrap-around);
        rows, cols ≥ 3 so that the graph is 4-regular (no double edges).
    erdos_renyi(p): each of the n(n-1)/2 edges independently with probability p, the draw
        repeated (same generator, next draw) until the graph is connected, at most
        ``MAX_ER_TRIES`` times, then an error (p is too small for n: connectivity needs
        p ≳ ln(n)/n).
    exponential: i ~ i ± 2^k (mod n) for k = 0..⌊log2(n-1)⌋. This is the *undirected*
        (symmetrised) version of the static exponential graph of Ying et al. 2021 (who use
        the directed one, i → i + 2^k); symmetric so that Metropolis–Hastings weights and
        the symmetric check apply. It is circulant: the eigenvalues of any circulant W are
        the real DFT of its first row.
    complete: every pair.
    random_matching: time-varying; every round (and gossip step) a uniformly random
        matching of ⌊n/2⌋ pairs (one node idle when n is odd). Each W_t averages the
        matched pairs (weight 1/2: Metropolis–Hastings and uniform coincide); a single
        W_t is disconnected (spectral gap 0), only the expected mixing E[W_t] contracts.

Mixing weights:
    metropolis_hastings: W_ij = 1 / (1 + max(d_i, d_j)) on edges, W_ii = 1 − Σ_j W_ij.
        Doubly stochastic on any graph (Xiao & Boyd 2004, "Fast linear iterations for
        distributed averaging", eq. 10; Boyd et al. 2004 "Fastest mixing Markov chain").
    uniform: W_ij = 1 / (d + 1) on edges and the diagonal; doubly stochastic only on a
        d-regular graph, so it is refused elsewhere (use metropolis_hastings). On regular
        graphs both coincide.

Spectral gap: with the eigenvalues 1 = λ_1 ≥ λ_2 ≥ … ≥ λ_n of W, the mixing rate is
``ρ = max(|λ_2|, |λ_n|)`` (``second_eigenvalue``) and the gap is ``1 − ρ``. One gossip
step contracts the consensus distance (1/n) Σ ‖x_i − x̄‖² by at most ρ² (exactly ρ² for a
deviation in the eigenspace of ρ). Closed forms used by the tests and the reproduction:
    ring, uniform 1/3: λ_k = (1 + 2 cos(2πk/n)) / 3, so ρ = (1 + 2 cos(2π/n)) / 3 for n ≥ 5
        (for smaller n the most negative eigenvalue can dominate: ``ring_eigenvalues``).
    torus r × c, uniform 1/5: λ_{a,b} = (1 + 2 cos(2πa/r) + 2 cos(2πb/c)) / 5 (the torus
        adjacency is the Kronecker sum of the two ring adjacencies, so its eigenvalues are
        the pairwise sums of the ring ones).
    exponential, uniform 1/(|S|+1) with S = {±2^k mod n}: λ_m = (1 + Σ_{s∈S} cos(2πms/n))
        / (|S| + 1) (circulant).
    complete, uniform 1/n: W = 11ᵀ/n, eigenvalues {1, 0, …, 0}, gap 1 (one step averages).

Pitfalls: a disconnected graph has λ_2 = 1 (gap 0; no consensus); a bipartite graph with
weights that leave no diagonal mass has λ_n = −1 (an even ring with W_ii = 0 oscillates),
which is why ρ takes |λ_n| into account and why both weightings keep W_ii > 0.

References:
    Lian et al. "Can Decentralized Algorithms Outperform Centralized Algorithms?" NeurIPS
    2017 (D-PSGD). Koloskova et al. "A Unified Theory of Decentralized SGD with Changing
    Topology and Local Updates", ICML 2020 (local steps, time-varying graphs). Ying et al.
    "Exponential Graph is Provably Efficient for Decentralized Deep Training", NeurIPS 2021.
"""

from __future__ import annotations

import math

import numpy as np

MAX_ER_TRIES = 1000  # Erdős–Rényi redraws before giving up (documented above)
GRAPHS = ("ring", "torus", "erdos_renyi", "exponential", "complete", "random_matching")
MIXINGS = ("metropolis_hastings", "uniform")


def _check_n(n: int, least: int, kind: str) -> None:
    if n < least:
        raise ValueError(f"{kind} needs at least {least} nodes, got n={n}")


def _from_edges(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    for i, j in edges:
        if i != j:
            a[i, j] = a[j, i] = True
    return a


def ring(n: int) -> np.ndarray:
    """Ring adjacency (i ~ i ± 1 mod n)."""
    _check_n(n, 3, "ring")
    return _from_edges(n, [(i, (i + 1) % n) for i in range(n)])


def torus_shape(n: int) -> tuple[int, int]:
    """The most square rows × cols = n with rows ≤ cols and rows ≥ 3.

    Raises:
        ValueError: no such factorisation (n prime, or n < 9, or n = 3·p with p < 3).
    """
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0:
            return rows, n // rows
    raise ValueError(f"torus: n={n} has no factorisation rows × cols with rows, cols ≥ 3; "
                     "choose another num_clients or give topology.rows")


def torus(rows: int, cols: int) -> np.ndarray:
    """2-D torus adjacency; node r·cols + c."""
    if rows < 3 or cols < 3:
        raise ValueError(f"torus needs rows, cols ≥ 3 (a 4-regular graph), got {rows} × {cols}")
    n = rows * cols
    edges = []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            edges += [(i, ((r + 1) % rows) * cols + c), (i, r * cols + (c + 1) % cols)]
    return _from_edges(n, edges)


def complete(n: int) -> np.ndarray:
    """Complete-graph adjacency."""
    _check_n(n, 2, "complete")
    return ~np.eye(n, dtype=bool)


def exponential(n: int) -> np.ndarray:
    """Undirected exponential graph: i ~ i ± 2^k (mod n), k = 0..⌊log2(n-1)⌋."""
    _check_n(n, 2, "exponential")
    hops = [2**k for k in range(int(math.log2(n - 1)) + 1)] if n > 2 else [1]
    return _from_edges(n, [(i, (i + h) % n) for i in range(n) for h in hops])


def is_connected(a: np.ndarray) -> bool:
    """Whether the undirected graph ``a`` is connected (breadth-first search from node 0)."""
    n = len(a)
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    while frontier:
        nxt = np.flatnonzero(a[frontier].any(axis=0) & ~seen)
        seen[nxt] = True
        frontier = nxt.tolist()
    return bool(seen.all())


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """A connected G(n, p): draws are repeated until connected (at most MAX_ER_TRIES).

    Raises:
        ValueError: p outside (0, 1], or no connected draw within MAX_ER_TRIES.
    """
    _check_n(n, 2, "erdos_renyi")
    if not 0 < p <= 1:
        raise ValueError(f"erdos_renyi needs 0 < p <= 1, got p={p}")
    iu = np.triu_indices(n, 1)
    for _ in range(MAX_ER_TRIES):
        a = np.zeros((n, n), dtype=bool)
        a[iu] = rng.random(len(iu[0])) < p
        a |= a.T
        if is_connected(a):
            return a
    raise ValueError(f"erdos_renyi: no connected graph in {MAX_ER_TRIES} draws with n={n}, "
                     f"p={p}; connectivity needs p ≳ ln(n)/n = {math.log(n) / n:.3f}")


def random_matching(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random matching of ⌊n/2⌋ pairs (adjacency; every degree ≤ 1)."""
    _check_n(n, 2, "random_matching")
    perm = rng.permutation(n)
    return _from_edges(n, [(int(perm[k]), int(perm[k + 1])) for k in range(0, n - 1, 2)])


def graph(kind: str, n: int, *, p: float = 0.3, rows: int | None = None,
          rng: np.random.Generator | None = None) -> np.ndarray:
    """The adjacency of a static graph (or one draw of ``random_matching``) by name.

    Args:
        kind: one of GRAPHS.
        n: number of nodes.
        p: erdos_renyi edge probability.
        rows: torus rows (None = ``torus_shape(n)``); cols = n / rows.
        rng: the generator of erdos_renyi and random_matching.
    """
    if kind == "ring":
        return ring(n)
    if kind == "torus":
        if rows is None:
            rows, cols = torus_shape(n)
        elif n % rows:
            raise ValueError(f"torus: rows={rows} does not divide n={n}")
        else:
            cols = n // rows
        return torus(rows, cols)
    if kind == "complete":
        return complete(n)
    if kind == "exponential":
        return exponential(n)
    if kind in ("erdos_renyi", "random_matching"):
        if rng is None:
            raise ValueError(f"{kind} needs a seeded generator")
        return erdos_renyi(n, p, rng) if kind == "erdos_renyi" else random_matching(n, rng)
    raise ValueError(f"unknown graph {kind!r}; known: {list(GRAPHS)}")


def metropolis_hastings(a: np.ndarray) -> np.ndarray:
    """Metropolis–Hastings weights W_ij = 1/(1 + max(d_i, d_j)) on the edges of ``a``."""
    deg = a.sum(axis=1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


def uniform(a: np.ndarray) -> np.ndarray:
    """Uniform weights 1/(d+1) on the edges and the diagonal of a d-regular graph.

    Raises:
        ValueError: the graph is not regular (the weights would not be doubly stochastic).
    """
    deg = a.sum(axis=1)
    if not (deg == deg[0]).all():
        raise ValueError(f"uniform mixing needs a regular graph (degrees {deg.min()}..."
                         f"{deg.max()}); use metropolis_hastings")
    w = a / (deg[0] + 1.0)
    np.fill_diagonal(w, 1.0 / (deg[0] + 1.0))
    return w


def mixing_matrix(a: np.ndarray, mixing: str) -> np.ndarray:
    """The validated mixing matrix of graph ``a`` (float64)."""
    if mixing == "metropolis_hastings":
        w = metropolis_hastings(a)
    elif mixing == "uniform":
        w = uniform(a)
    else:
        raise ValueError(f"unknown mixing {mixing!r}; known: {list(MIXINGS)}")
    validate_mixing(w, a)
    return w


def validate_mixing(w: np.ndarray, a: np.ndarray | None = None, tol: float = 1e-12) -> None:
    """Check that W is square, symmetric, non-negative, doubly stochastic (and supported
    on the graph ``a`` plus the diagonal, when given).

    Raises:
        ValueError: naming the first property that fails and by how much.
    """
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"mixing matrix must be square, got shape {w.shape}")
    asym = float(np.abs(w - w.T).max())
    if asym > tol:
        raise ValueError(f"mixing matrix is not symmetric (max |W - Wᵀ| = {asym:.3g})")
    if float(w.min()) < -tol:
        raise ValueError(f"mixing matrix has a negative entry ({float(w.min()):.3g})")
    rows = float(np.abs(w.sum(axis=1) - 1.0).max())
    if rows > tol * len(w):
        raise ValueError(f"mixing matrix is not stochastic (max |W 1 - 1| = {rows:.3g})")
    if a is not None:
        off = w.copy()
        np.fill_diagonal(off, 0.0)
        if (np.abs(off[~a]) > tol).any():
            raise ValueError("mixing matrix has weight on a pair that is not an edge")


def second_eigenvalue(w: np.ndarray) -> float:
    """ρ = max(|λ_2|, |λ_n|) of a symmetric doubly stochastic W (λ_1 = 1 dropped)."""
    ev = np.sort(np.linalg.eigvalsh(w))[::-1]
    return float(np.abs(ev[1:]).max()) if len(ev) > 1 else 0.0


def spectral_gap(w: np.ndarray) -> float:
    """1 − ρ (see ``second_eigenvalue``)."""
    return 1.0 - second_eigenvalue(w)


def ring_eigenvalues(n: int) -> np.ndarray:
    """Closed form: eigenvalues (1 + 2 cos(2πk/n)) / 3 of the ring with weights 1/3."""
    return (1.0 + 2.0 * np.cos(2.0 * np.pi * np.arange(n) / n)) / 3.0


def torus_eigenvalues(rows: int, cols: int) -> np.ndarray:
    """Closed form: (1 + 2cos(2πa/rows) + 2cos(2πb/cols)) / 5 for the torus with weights 1/5."""
    ca = 2.0 * np.cos(2.0 * np.pi * np.arange(rows) / rows)
    cb = 2.0 * np.cos(2.0 * np.pi * np.arange(cols) / cols)
    return ((1.0 + ca[:, None] + cb[None, :]) / 5.0).ravel()


def exponential_eigenvalues(n: int) -> np.ndarray:
    """Closed form for the exponential graph with weights 1/(|S|+1), S = {±2^k mod n}
    its neighbour offsets: λ_m = (1 + Σ_{s∈S} cos(2πms/n)) / (|S| + 1) (circulant)."""
    hops = [2**k for k in range(int(math.log2(n - 1)) + 1)] if n > 2 else [1]
    offsets = sorted({h % n for h in hops} | {(-h) % n for h in hops})
    m = np.arange(n)[:, None]
    return (1.0 + np.cos(2.0 * np.pi * m * np.array(offsets)[None, :] / n).sum(axis=1)) / (
        len(offsets) + 1.0)


def closed_form_second_eigenvalue(kind: str, n: int, rows: int | None = None) -> float | None:
    """ρ from the closed forms above for ring, torus, exponential and complete (uniform
    weights, which Metropolis–Hastings equals on these regular graphs); None otherwise."""
    if kind == "ring":
        ev = ring_eigenvalues(n)
    elif kind == "exponential":
        ev = exponential_eigenvalues(n)
    elif kind == "torus":
        r = rows if rows is not None else torus_shape(n)[0]
        ev = torus_eigenvalues(r, n // r)
    elif kind == "complete":
        return 0.0
    else:
        return None
    return float(np.sort(np.abs(ev))[-2])  # the largest |λ| after λ_1 = 1
