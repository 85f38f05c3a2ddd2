"""Graphs and mixing matrices against closed forms (fedflat.decentralized.topology)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedflat.decentralized import topology as topo
from fedflat.rng import numpy_rng


def _eig(w: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh(w))


@pytest.mark.parametrize("n", [5, 8, 16, 25])
def test_ring_uniform_lambda2_closed_form(n):
    w = topo.mixing_matrix(topo.ring(n), "uniform")
    assert np.allclose(w[0, [1, n - 1, 0]], 1 / 3)
    # Circulant with first row (1/3, 1/3, 0, ..., 1/3): λ_k = (1 + 2 cos(2πk/n)) / 3.
    expected = np.sort([(1 + 2 * math.cos(2 * math.pi * k / n)) / 3 for k in range(n)])
    assert np.allclose(_eig(w), expected, atol=1e-12)
    lam2 = (1 + 2 * math.cos(2 * math.pi / n)) / 3
    assert topo.second_eigenvalue(w) == pytest.approx(lam2, abs=1e-12)
    assert topo.closed_form_second_eigenvalue("ring", n) == pytest.approx(lam2, abs=1e-12)
    # On a regular graph Metropolis–Hastings gives the same weights.
    assert np.allclose(topo.mixing_matrix(topo.ring(n), "metropolis_hastings"), w)


def test_small_even_ring_rho_is_the_negative_eigenvalue():
    # n = 4: eigenvalues 1, 1/3, 1/3, -1/3: ρ = 1/3, and 1 - ρ the gap.
    w = topo.mixing_matrix(topo.ring(4), "uniform")
    assert np.allclose(_eig(w), [-1 / 3, 1 / 3, 1 / 3, 1])
    assert topo.spectral_gap(w) == pytest.approx(2 / 3)


@pytest.mark.parametrize("n", [2, 7, 16])
def test_complete_graph_is_exact_averaging(n):
    for mixing in ("uniform", "metropolis_hastings"):
        w = topo.mixing_matrix(topo.complete(n), mixing)
        assert np.allclose(w, np.full((n, n), 1 / n))
        assert topo.spectral_gap(w) == pytest.approx(1.0, abs=1e-12)
        assert np.allclose(_eig(w), [0] * (n - 1) + [1], atol=1e-12)


@pytest.mark.parametrize(("rows", "cols"), [(3, 3), (4, 4), (3, 5), (4, 6)])
def test_torus_eigenvalues_are_sums_of_ring_ones(rows, cols):
    a = topo.torus(rows, cols)
    assert (a.sum(axis=1) == 4).all()
    w = topo.mixing_matrix(a, "uniform")
    # W = (I + A_r ⊕ A_c) / 5 with ⊕ the Kronecker sum: the adjacency eigenvalues are the
    # sums 2cos(2πa/r) + 2cos(2πb/c) of the two ring adjacencies' eigenvalues.
    ring_r = [2 * math.cos(2 * math.pi * k / rows) for k in range(rows)]
    ring_c = [2 * math.cos(2 * math.pi * k / cols) for k in range(cols)]
    expected = np.sort([(1 + x + y) / 5 for x in ring_r for y in ring_c])
    assert np.allclose(_eig(w), expected, atol=1e-12)
    assert np.allclose(np.sort(topo.torus_eigenvalues(rows, cols)), expected)
    rho = max(abs(v) for v in expected[:-1])
    assert topo.second_eigenvalue(w) == pytest.approx(rho, abs=1e-12)
    assert topo.closed_form_second_eigenvalue("torus", rows * cols, rows) == pytest.approx(rho)


def test_torus_shape_and_refusals():
    assert topo.torus_shape(16) == (4, 4)
    assert topo.torus_shape(12) == (3, 4)
    for n in (7, 8, 13):
        with pytest.raises(ValueError, match="torus"):
            topo.torus_shape(n)
    with pytest.raises(ValueError, match="rows"):
        topo.graph("torus", 16, rows=3)


def test_direction_ring_slower_than_torus_slower_than_complete():
    n = 16
    gaps = [topo.spectral_gap(topo.mixing_matrix(topo.graph(k, n), "metropolis_hastings"))
            for k in ("ring", "torus", "exponential", "complete")]
    assert gaps == sorted(gaps)
    assert gaps[0] < gaps[1] < gaps[2] < gaps[3]


@pytest.mark.parametrize("n", [6, 16, 21])
def test_exponential_graph_is_circulant_with_dft_eigenvalues(n):
    a = topo.exponential(n)
    hops = {2**k for k in range(int(math.log2(n - 1)) + 1)}
    assert set(np.flatnonzero(a[0])) == {h % n for h in hops} | {(-h) % n for h in hops}
    w = topo.mixing_matrix(a, "uniform")
    # Circulant: every row is the first one rolled; eigenvalues = DFT of the first row.
    assert all(np.allclose(np.roll(w[0], i), w[i]) for i in range(n))
    dft = np.fft.fft(w[0]).real
    assert np.allclose(_eig(w), np.sort(dft), atol=1e-12)
    assert np.allclose(np.sort(topo.exponential_eigenvalues(n)), np.sort(dft), atol=1e-12)
    rho = np.sort(np.abs(dft))[-2]
    assert topo.closed_form_second_eigenvalue("exponential", n) == pytest.approx(rho)


@pytest.mark.parametrize("seed", range(5))
def test_erdos_renyi_connected_and_mh_doubly_stochastic(seed):
    n, p = 20, 0.2
    a = topo.erdos_renyi(n, p, numpy_rng(seed, "topology", 0))
    assert topo.is_connected(a)
    assert (a == a.T).all()
    assert not a.diagonal().any()
    w = topo.mixing_matrix(a, "metropolis_hastings")
    assert np.allclose(w.sum(axis=0), 1)
    assert np.allclose(w.sum(axis=1), 1)
    assert (w >= 0).all()
    assert np.allclose(w, w.T)
    assert (w.diagonal() > 0).all()
    off = w.copy()
    np.fill_diagonal(off, 0)
    assert ((off > 0) == a).all()
    deg = a.sum(axis=1)
    i, j = np.argwhere(a)[0]
    assert w[i, j] == pytest.approx(1 / (1 + max(deg[i], deg[j])))
    # Connected: λ_1 = 1 is simple, so the gap is positive.
    assert 0 < topo.spectral_gap(w) < 1
    # Same stream, same graph; another seed, another graph.
    assert (topo.erdos_renyi(n, p, numpy_rng(seed, "topology", 0)) == a).all()
    assert not (topo.erdos_renyi(n, p, numpy_rng(seed + 100, "topology", 0)) == a).all()


def test_erdos_renyi_gives_up_when_p_too_small():
    with pytest.raises(ValueError, match="no connected graph"):
        topo.erdos_renyi(30, 0.01, numpy_rng(0, "topology", 0))


def test_uniform_refused_on_irregular_graph():
    a = topo.erdos_renyi(12, 0.3, numpy_rng(1, "topology", 0))
    assert len(set(a.sum(axis=1))) > 1
    with pytest.raises(ValueError, match="regular"):
        topo.mixing_matrix(a, "uniform")


@pytest.mark.parametrize("n", [8, 9])
def test_random_matching(n):
    a = topo.random_matching(n, numpy_rng(0, "topology", 1, 0, 0))
    deg = a.sum(axis=1)
    assert deg.max() == 1
    assert deg.sum() == 2 * (n // 2)
    w = topo.mixing_matrix(a, "metropolis_hastings")
    i, j = np.argwhere(a)[0]
    assert w[i, j] == pytest.approx(0.5)
    assert w[i, i] == pytest.approx(0.5)
    assert topo.spectral_gap(w) == pytest.approx(0.0, abs=1e-12)  # one W_t is disconnected
    b = topo.random_matching(n, numpy_rng(0, "topology", 1, 1, 0))
    assert not (a == b).all()


def test_validate_mixing_rejects():
    a = topo.ring(5)
    w = topo.mixing_matrix(a, "uniform")
    bad = w.copy()
    bad[0, 1] += 0.1
    bad[0, 0] -= 0.1
    with pytest.raises(ValueError, match="symmetric"):
        topo.validate_mixing(bad)
    with pytest.raises(ValueError, match="stochastic"):
        topo.validate_mixing(w * 1.1)
    with pytest.raises(ValueError, match="negative"):
        topo.validate_mixing(np.array([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="not an edge"):
        topo.validate_mixing(np.full((5, 5), 0.2), a)
