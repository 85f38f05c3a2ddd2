"""Sharpness metrics on models whose Hessian is known in closed form.

Linear least squares with loss ½ mean((Xw − y)²) has Hessian H = XᵀX/n everywhere
(X augmented by ones for a bias); numpy's eigvalsh/trace give the reference values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedflat.metrics import hessian_trace, hvp, lambda_max, m_sharpness
from fedflat.models import FlatModel, build_model
from fedflat.rng import stream

torch.set_num_threads(1)


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y).square().mean()


def neg_half_square(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -0.5 * out.squeeze(-1).square().mean()


def designed_x(n: int, singular: np.ndarray, seed: int) -> np.ndarray:
    """X = U diag(s) Vᵀ so that XᵀX/n has eigenvalues s²/n (a clear spectral gap)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, len(singular))))
    v, _ = np.linalg.qr(rng.normal(size=(len(singular), len(singular))))
    return u @ np.diag(singular) @ v.T


def regression(x: np.ndarray, loss=half_mse, bias: bool = False, seed: int = 0):
    n, d = x.shape
    model = FlatModel(nn.Linear(d, 1, bias=bias))
    model.loss_fn = loss
    rng = np.random.default_rng(seed)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(rng.normal(size=n), dtype=torch.float32)
    w = torch.tensor(rng.normal(size=model.num_params), dtype=torch.float32)
    xa = xt.double().numpy()
    if bias:
        xa = np.concatenate([xa, np.ones((n, 1))], axis=1)
    return model, w, xt, yt, xa.T @ xa / n


def test_hvp_accumulates_unequal_batches_like_the_full_data():
    x = np.random.default_rng(1).normal(size=(30, 4))
    model, w, xt, yt, h = regression(x, bias=True)
    batches = [(xt[:7], yt[:7]), (xt[7:20], yt[7:20]), (xt[20:], yt[20:])]
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    got = hvp(model, w, batches, v)
    expected = h @ v.double().numpy()
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_lambda_max_within_one_percent_of_the_true_top_eigenvalue():
    s = np.array([9.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    model, w, xt, yt, h = regression(designed_x(64, s, seed=2))
    batches = [(xt[:40], yt[:40]), (xt[40:], yt[40:])]
    res = lambda_max(model, w, batches, gen=stream(0, "eval"))
    true = np.linalg.eigvalsh(h)[-1]
    assert res.value == pytest.approx(true, rel=0.01)
    assert 1 < res.iterations <= 100
    # the returned vector is (close to) the top eigenvector
    top = np.linalg.eigh(h)[1][:, -1]
    assert abs(float(res.vector.double().numpy() @ top)) > 0.99


def test_lambda_max_reports_the_sign_of_dominant_negative_curvature():
    s = np.array([8.0, 3.0, 1.0, 0.5])
    model, w, xt, yt, h = regression(designed_x(32, s, seed=3), loss=neg_half_square)
    res = lambda_max(model, w, [(xt, yt)], gen=stream(1, "eval"))
    assert res.value == pytest.approx(-np.linalg.eigvalsh(h)[-1], rel=0.01)
    assert res.value < 0


def test_hessian_trace_within_five_percent():
    rng = np.random.default_rng(4)
    # Mostly axis-aligned columns of different scales: a diagonally dominant XᵀX.
    x = rng.normal(size=(200, 10)) * np.linspace(0.5, 3.0, 10)
    x = x + 0.2 * rng.normal(size=(200, 1))
    model, w, xt, yt, h = regression(x, bias=True)
    res = hessian_trace(
        model, w, [(xt, yt)], gen=stream(2, "eval"), max_iter=100, tol=0.0
    )
    true = np.trace(h)
    assert res.samples == 100
    assert res.mean == pytest.approx(true, rel=0.05)
    # Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v: the reported std error matches it.
    off = h - np.diag(np.diag(h))
    assert res.std_error == pytest.approx(np.sqrt(2 * np.sum(off**2) / 100), rel=0.35)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    x = np.zeros((6, 3))
    x[0:2, 0], x[2:4, 1], x[4:6, 2] = 1.0, 2.0, 3.0  # orthogonal columns: XᵀX diagonal
    model, w, xt, yt, h = regression(x)
    res = hessian_trace(model, w, [(xt, yt)], gen=stream(3, "eval"))
    assert res.mean == pytest.approx(np.trace(h), rel=1e-6)
    assert res.std_error == pytest.approx(0.0, abs=1e-6)
    assert res.samples == 2  # the running mean did not change: PyHessian's rule stops


def test_metrics_use_eval_mode_and_leave_batchnorm_statistics_alone():
    module = build_model(
        "cnn", (1, 8, 8), 3, channels=(2, 4), hidden=(8,), norm="batch"
    )
    model = FlatModel(module)
    model.module.train()
    w = model.init_params(stream(0, "init"))
    x = torch.randn(5, 1, 8, 8, generator=stream(0, "data"))
    y = torch.randint(0, 3, (5,), generator=stream(1, "data"))
    before = [b.clone() for b in model.module.buffers()]
    lambda_max(model, w, [(x, y)], gen=stream(0, "eval"), max_iter=3)
    hessian_trace(model, w, [(x, y)], gen=stream(0, "eval"), max_iter=2)
    m_sharpness(model, w, (x, y), m=2, rho=0.05)
    assert model.module.training
    for b, c in zip(model.module.buffers(), before, strict=True):
        assert torch.equal(b, c)


def test_m_sharpness_one_step_matches_the_closed_form_per_subset():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(24, 3))
    model, w, xt, yt, _ = regression(x)
    rho, m = 0.3, 8
    wd = w.double().numpy()
    expected = 0.0
    for start in range(0, 24, m):
        xs, ys = x[start : start + m], yt.double().numpy()[start : start + m]
        a = xs.T @ xs / m
        g = a @ wd - xs.T @ ys / m
        gh = g / np.linalg.norm(g)
        # L(w + ρĝ) − L(w) = ρ‖g‖ + ½ρ² ĝᵀAĝ exactly for a quadratic
        expected += m * (rho * np.linalg.norm(g) + 0.5 * rho**2 * gh @ a @ gh)
    expected /= 24
    res = m_sharpness(model, w, (xt, yt), m=m, rho=rho, k=1)
    assert res.subsets == 3
    assert res.value == pytest.approx(expected, rel=1e-4)


def test_m_sharpness_more_ascent_steps_stay_between_sam_and_the_upper_bound():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(16, 4)) * np.array([3.0, 1.0, 0.5, 0.2])
    model, w, xt, yt, h = regression(x)
    rho = 1.0
    one = m_sharpness(model, w, (xt, yt), m=16, rho=rho, k=1).value
    many = m_sharpness(model, w, (xt, yt), m=16, rho=rho, k=8).value
    g = h @ w.double().numpy() - x.T @ yt.double().numpy() / 16
    # max over the ball ≤ ρ‖g‖ + ½ρ²λ_max (Cauchy–Schwarz on each term)
    bound = rho * np.linalg.norm(g) + 0.5 * rho**2 * np.linalg.eigvalsh(h)[-1]
    assert one <= many + 1e-6
    assert many <= bound * (1 + 1e-5)
