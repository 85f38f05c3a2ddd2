"""SAM-family oracles checked against closed forms on quadratic losses.

The quadratic is linear least squares through a real ``FlatModel``:
``L(w) = ½ mean((Xw − y)²) = ½ (w − a)ᵀ A (w − a) + const`` with ``A = XᵀX/n`` (X
augmented by a column of ones when the layer has a bias). Its gradient ``A w − Xᵀy/n``
is computed independently in float64 numpy.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from fedflat.client.local_chain import StepEnd
from fedflat.client.oracle_base import UpdateContext, plain
from fedflat.client.oracles import (
    FEDSMOO_MU,
    FEDSMOO_S,
    ORACLE_NAMES,
    asam,
    fedsmoo,
    fisher_sam,
    gam,
    lesam,
    make_oracle,
    sam,
    sam_on,
)
from fedflat.models import FlatModel, build_model
from fedflat.rng import stream

torch.set_num_threads(1)


def half_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out.squeeze(-1) - y).square().mean()


class Problem:
    """Linear least squares with its float64 closed forms."""

    def __init__(
        self, d: int = 5, n: int = 32, bias: bool = False, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.x = torch.tensor(rng.normal(size=(n, d)), dtype=torch.float32)
        self.y = torch.tensor(rng.normal(size=n), dtype=torch.float32)
        self.model = FlatModel(nn.Linear(d, 1, bias=bias))
        self.model.loss_fn = half_mse
        xa = self.x.double().numpy()
        if bias:
            xa = np.concatenate([xa, np.ones((n, 1))], axis=1)
        self.xa = xa
        self.a_mat = xa.T @ xa / n
        self.b = xa.T @ self.y.double().numpy() / n
        w = rng.normal(size=self.model.num_params)
        self.w = torch.tensor(w, dtype=torch.float32)

    def grad(self, w: np.ndarray) -> np.ndarray:
        return self.a_mat @ w - self.b

    def loss(self, w: np.ndarray) -> float:
        r = self.xa @ w - self.y.double().numpy()
        return 0.5 * float(np.mean(r**2))

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def ctx(self, **kw) -> UpdateContext:
        return UpdateContext(
            model=self.model,
            x_global=self.w.clone(),
            round=0,
            client_id=0,
            num_samples=32,
            **kw,
        )


def record_points(model: FlatModel) -> list[torch.Tensor]:
    """Make model.loss_grad log every point it is evaluated at."""
    points: list[torch.Tensor] = []
    original = model.loss_grad

    def logged(w, x, y):
        points.append(w.detach().clone())
        return original(w, x, y)

    model.loss_grad = logged  # type: ignore[method-assign]
    return points


def run(oracle, prob: Problem, ctx: UpdateContext | None = None):
    ctx = ctx or prob.ctx()
    state = oracle.init(ctx)
    w_before = prob.w.clone()
    gen = stream(0, "client")
    loss, g, state, metrics = oracle.grad(prob.w, prob.batch, state, gen, ctx)
    assert torch.equal(prob.w, w_before), "the oracle mutated w"
    return loss, g, state, metrics


def close(actual: torch.Tensor, expected: np.ndarray, rtol: float = 2e-5) -> None:
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=rtol, atol=1e-5)


# --------------------------------------------------------------------------- SAM
def test_sam_matches_closed_form_on_quadratic():
    prob = Problem()
    rho = 0.3
    w = prob.w.double().numpy()
    g = prob.grad(w)
    expected = prob.grad(w + rho * g / np.linalg.norm(g))
    loss, g_sam, _, metrics = run(sam(rho=rho), prob)
    close(g_sam, expected)
    assert float(loss) == pytest.approx(prob.loss(w), rel=1e-5)
    gap = prob.loss(w + rho * g / np.linalg.norm(g)) - prob.loss(w)
    assert metrics["sam_loss_gap"] == pytest.approx(gap, rel=1e-3)


def test_sam_wd_in_perturbation_gives_gradient_of_l2_loss_at_perturbed_point():
    prob = Problem()
    rho, lam = 0.2, 0.1
    w = prob.w.double().numpy()
    d = prob.grad(w) + lam * w
    e = rho * d / np.linalg.norm(d)
    # returned g + λw (added by the base optimizer) = ∇[L + ½λ‖·‖²](w + ε)
    expected_total = prob.grad(w + e) + lam * (w + e)
    _, g_sam, _, _ = run(sam(rho=rho, wd_in_perturbation=True, weight_decay=lam), prob)
    close(g_sam + lam * prob.w, expected_total)


def small_bn_cnn() -> FlatModel:
    module = build_model(
        "cnn", (1, 8, 8), 3, channels=(2, 4), hidden=(8,), norm="batch"
    )
    model = FlatModel(module)
    model.module.train()
    return model


def cnn_batch(seed: int = 0, n: int = 6):
    gen = stream(seed, "data")
    x = torch.randn(n, 1, 8, 8, generator=gen)
    return x, torch.randint(0, 3, (n,), generator=gen)


def test_sam_with_rho_zero_equals_plain_sgd_exactly():
    model_a, model_b = small_bn_cnn(), small_bn_cnn()
    w0 = model_a.init_params(stream(0, "init"))
    model_b.set_buffers(model_a.get_buffers())
    ctx_a = UpdateContext(
        model=model_a, x_global=w0, round=0, client_id=0, num_samples=6
    )
    ctx_b = UpdateContext(
        model=model_b, x_global=w0, round=0, client_id=0, num_samples=6
    )
    o_sam, o_sgd = sam(rho=0.0), plain()
    s_sam, s_sgd = o_sam.init(ctx_a), o_sgd.init(ctx_b)
    wa, wb = w0.clone(), w0.clone()
    gen = stream(0, "client")
    for step in range(3):
        batch = cnn_batch(step)
        la, ga, s_sam, _ = o_sam.grad(wa, batch, s_sam, gen, ctx_a)
        lb, gb, s_sgd, _ = o_sgd.grad(wb, batch, s_sgd, gen, ctx_b)
        assert torch.equal(ga, gb)
        assert torch.equal(la, lb)
        wa, wb = wa - 0.1 * ga, wb - 0.1 * gb
    assert torch.equal(wa, wb)
    for ba, bb in zip(model_a.module.buffers(), model_b.module.buffers(), strict=True):
        assert torch.equal(ba, bb)


@pytest.mark.parametrize(
    "oracle",
    [
        sam(rho=0.5),
        asam(rho=1.0, eta=0.1),
        gam(grad_rho=0.1, grad_norm_rho=0.2, beta0=0.1, beta1=0.1, gamma=0.05),
        sam_on(rho=1.0),
        fisher_sam(rho=0.5),
        fedsmoo(rho=0.5),
    ],
    ids=["sam", "asam", "gam", "sam_on", "fisher_sam", "fedsmoo"],
)
def test_batchnorm_statistics_come_from_the_first_pass_only(oracle):
    model = small_bn_cnn()
    w = model.init_params(stream(1, "init"))
    start = [b.clone() for b in model.module.buffers()]
    batch = cnn_batch(3)
    model.loss_grad(w, *batch)  # what one plain pass does to the statistics
    expected = [b.clone() for b in model.module.buffers()]
    for b, s in zip(model.module.buffers(), start, strict=True):
        b.copy_(s)
    ctx = UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=6)
    oracle.grad(w, batch, oracle.init(ctx), stream(0, "client"), ctx)
    got = list(model.module.buffers())
    assert not torch.equal(expected[0], start[0])  # the pass did move the running mean
    for b, e in zip(got, expected, strict=True):
        assert torch.equal(b, e)


# --------------------------------------------------------------------------- ASAM
def test_asam_official_scales_only_weight_tensors():
    prob = Problem(bias=True)
    rho, eta = 0.5, 0.2
    w = prob.w.double().numpy()
    g = prob.grad(w)
    t = np.abs(w) + eta
    t[-1] = 1.0  # the bias has T = 1 in the official variant
    e = rho * t**2 * g / np.linalg.norm(t * g)
    _, g_asam, _, _ = run(asam(rho=rho, eta=eta, variant="official"), prob)
    close(g_asam, prob.grad(w + e))


def test_asam_davda54_scales_all_tensors_without_eta():
    prob = Problem(bias=True)
    rho = 0.5
    w = prob.w.double().numpy()
    g = prob.grad(w)
    e = rho * w**2 * g / np.linalg.norm(np.abs(w) * g)
    _, g_asam, _, _ = run(asam(rho=rho, variant="davda54"), prob)
    close(g_asam, prob.grad(w + e))


def test_asam_rejects_bad_settings():
    with pytest.raises(ValueError, match="davda54"):
        asam(rho=0.5, eta=0.1, variant="davda54")
    with pytest.raises(ValueError, match="variant"):
        asam(rho=0.5, variant="other")
    with pytest.raises(ValueError, match="rho"):
        asam(rho=-1.0)


# --------------------------------------------------------------------------- GAM
def test_gam_takes_four_passes_and_combines_as_specified():
    prob = Problem(d=4)
    rho_t, rho_n, b0, b1, gamma = 0.1, 0.3, 0.2, 0.4, 0.5
    points = record_points(prob.model)
    oracle = gam(grad_rho=rho_t, grad_norm_rho=rho_n, beta0=b0, beta1=b1, gamma=gamma)
    _, d_gam, _, _ = run(oracle, prob)
    assert oracle.passes == 4
    assert len(points) == 4

    def unit(v):
        return v / np.linalg.norm(v)

    w = prob.w.double().numpy()
    g0 = prob.grad(w)
    g1 = prob.grad(w + rho_t * unit(g0))
    w12 = w + rho_n * unit(g1 - g0)
    g2 = prob.grad(w12)
    w3 = w12 + rho_t * unit(g2)
    g3 = prob.grad(w3)
    p = g0 + (1 - b0) * g2
    d = b1 * g1 + (1 - b1) * g3
    p_perp = p - (p @ d) / (d @ d) * d
    expected = d - gamma * p_perp
    close(points[2], w12)
    close(points[3], w3)
    close(d_gam, expected, rtol=1e-4)
    # the correction is orthogonal to d: removing it leaves ⟨result, d⟩ = ‖d‖²
    assert float(d_gam.double().numpy() @ d) == pytest.approx(d @ d, rel=1e-4)


# --------------------------------------------------------------------------- SAM-ON
def norm_net() -> FlatModel:
    # A Linear layer *named* "bn" must not count as a norm layer; a LayerNorm named
    # "mix" must: selection is by module type.
    module = nn.Sequential(
        OrderedDict(
            bn=nn.Linear(4, 6), mix=nn.LayerNorm(6), act=nn.Tanh(), head=nn.Linear(6, 3)
        )
    )
    return FlatModel(module)


def test_sam_on_perturbs_only_normalisation_parameters():
    model = norm_net()
    w = model.init_params(stream(2, "init"))
    w = w + 0.1 * torch.randn(w.shape, generator=stream(3, "init"))
    x = torch.randn(10, 4, generator=stream(4, "data"))
    y = torch.randint(0, 3, (10,), generator=stream(5, "data"))
    norm_mask = model.mask(lambda s: s.name.startswith("mix."))
    assert int(norm_mask.sum()) == 12
    rho = 0.7
    points = record_points(model)
    ctx = UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=10)
    oracle = sam_on(rho=rho)
    _, g_on, _, _ = oracle.grad(w, (x, y), oracle.init(ctx), stream(0, "client"), ctx)
    _, g_plain = model.loss_grad(w, x, y)
    e = points[1] - points[0]
    assert torch.count_nonzero(e[~norm_mask]) == 0
    expected = rho * g_plain[norm_mask] / g_plain[norm_mask].norm()
    torch.testing.assert_close(e[norm_mask], expected, rtol=1e-5, atol=1e-6)
    assert float(e.norm()) == pytest.approx(rho, rel=1e-5)
    # the returned gradient covers all parameters (pass 2 at w + ε)
    _, g_ref = model.loss_grad(w + e, x, y)
    torch.testing.assert_close(g_on, g_ref)


def test_asam_on_uses_elementwise_operator_on_norm_weights():
    model = norm_net()
    w = model.init_params(stream(2, "init")) + 0.1
    x = torch.randn(10, 4, generator=stream(4, "data"))
    y = torch.randint(0, 3, (10,), generator=stream(5, "data"))
    rho, eta = 2.0, 0.01
    points = record_points(model)
    ctx = UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=10)
    oracle = sam_on(rho=rho, adaptive=True, eta=eta)
    oracle.grad(w, (x, y), oracle.init(ctx), stream(0, "client"), ctx)
    _, g = model.loss_grad(w, x, y)
    sel = model.mask(lambda s: s.name.startswith("mix."))
    weight = model.mask(lambda s: s.name == "mix.weight")
    t = torch.where(weight, w.abs() + eta, torch.ones_like(w))[sel].double()
    gs = g[sel].double()
    expected = rho * t**2 * gs / (t * gs).norm()
    e = (points[1] - points[0]).double()
    torch.testing.assert_close(e[sel], expected, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(e[~sel]) == 0


def test_sam_on_without_norm_layers_is_refused():
    prob = Problem()
    oracle = sam_on(rho=1.0)
    with pytest.raises(ValueError, match="normalisation"):
        oracle.init(prob.ctx())


def two_norm_net() -> FlatModel:
    # Two normalisation layers of different scale, so that a per-layer operator differs
    # from one shared value and from the element-wise one.
    module = nn.Sequential(OrderedDict(
        lin=nn.Linear(4, 6), n1=nn.LayerNorm(6), act=nn.Tanh(), mid=nn.Linear(6, 5),
        n2=nn.LayerNorm(5), head=nn.Linear(5, 3)))
    return FlatModel(module)


def _sam_on_epsilon(oracle) -> tuple[FlatModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, w, g at w, ε the oracle took) on two_norm_net with distinct norm weights."""
    model = two_norm_net()
    w = model.init_params(stream(2, "init"))
    w = w + 0.3 * torch.randn(w.shape, generator=stream(3, "init"))
    for name, scale in (("n1.weight", 0.5), ("n2.weight", 3.0)):
        seg = next(s for s in model.segments if s.name == name)
        w[seg.slice] *= scale
    x = torch.randn(10, 4, generator=stream(4, "data"))
    y = torch.randint(0, 3, (10,), generator=stream(5, "data"))
    points = record_points(model)
    ctx = UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=10)
    oracle.grad(w, (x, y), oracle.init(ctx), stream(0, "client"), ctx)
    _, g = model.loss_grad(w, x, y)
    return model, w, g, points[1] - points[0]


def _segment(model: FlatModel, name: str) -> slice:
    return next(s for s in model.segments if s.name == name).slice


def test_sam_on_linf_is_rho_sign_of_the_norm_gradient():
    # Reference p='infinity' (sam_bn.py): ε = ρ·sign(g) on the perturbed tensors, no
    # division by a norm; here with T = 1 (adaptive off).
    rho = 0.3
    model, _, g, e = _sam_on_epsilon(sam_on(rho=rho, p="infinity"))
    sel = model.mask(lambda s: s.name.startswith(("n1.", "n2.")))
    assert int(sel.sum()) == 2 * 6 + 2 * 5
    expected = rho * np.sign(g[sel].double().numpy())
    np.testing.assert_allclose(e[sel].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(e[~sel]) == 0
    assert float(e.abs().max()) == pytest.approx(rho, rel=1e-6)


def test_asam_on_linf_scales_the_sign_by_t_on_weights_only():
    # ASAM_BN with p='infinity', elementwise: weights get ρ·(|w| + η)·sign(g), biases
    # (normalize_bias off) ρ·sign(g).
    rho, eta = 0.5, 0.1
    model, w, g, e = _sam_on_epsilon(sam_on(rho=rho, adaptive=True, eta=eta, p="infinity"))
    for name in ("n1.weight", "n1.bias", "n2.weight", "n2.bias"):
        sl = _segment(model, name)
        wn, gn = w[sl].double().numpy(), g[sl].double().numpy()
        t = np.abs(wn) + eta if name.endswith("weight") else np.ones_like(wn)
        np.testing.assert_allclose(e[sl].double().numpy(), rho * t * np.sign(gn),
                                   rtol=1e-6, atol=1e-7)


def test_asam_on_layerwise_uses_one_norm_per_layer():
    # ASAM_BN --layerwise, p='2': T = ‖w_l‖₂·(1 + η) on each weight tensor w_l, 1 on biases;
    # ε = ρ T² g / ‖T g‖ with the norm over all perturbed tensors together.
    rho, eta = 2.0, 0.05
    model, w, g, e = _sam_on_epsilon(sam_on(rho=rho, adaptive=True, eta=eta, layerwise=True))
    names = ("n1.weight", "n1.bias", "n2.weight", "n2.bias")
    t, gs = {}, {}
    for name in names:
        sl = _segment(model, name)
        wn = w[sl].double().numpy()
        gs[name] = g[sl].double().numpy()
        scale = np.linalg.norm(wn) * (1 + eta) if name.endswith("weight") else 1.0
        t[name] = np.full_like(wn, scale)
    denom = np.sqrt(sum(float(np.sum((t[n] * gs[n]) ** 2)) for n in names))
    for name in names:
        expected = rho * t[name] ** 2 * gs[name] / denom
        np.testing.assert_allclose(e[_segment(model, name)].double().numpy(), expected,
                                   rtol=1e-5, atol=1e-7)
    # The two layers' weights differ 6x in scale, so their T differ (not one shared value).
    assert t["n1.weight"][0] != pytest.approx(t["n2.weight"][0], rel=0.5)
    sel = model.mask(lambda s: s.name.startswith(("n1.", "n2.")))
    assert torch.count_nonzero(e[~sel]) == 0


def test_asam_on_layerwise_linf_with_bias():
    # p='infinity', --layerwise --normalize_bias: ε = ρ·‖w_l‖(1 + η)·sign(g) on every tensor.
    rho, eta = 0.2, 0.0
    model, w, g, e = _sam_on_epsilon(sam_on(rho=rho, adaptive=True, eta=eta, p="infinity",
                                            layerwise=True, normalize_bias=True))
    for name in ("n1.weight", "n1.bias", "n2.weight", "n2.bias"):
        sl = _segment(model, name)
        wn, gn = w[sl].double().numpy(), g[sl].double().numpy()
        expected = rho * np.linalg.norm(wn) * (1 + eta) * np.sign(gn)
        np.testing.assert_allclose(e[sl].double().numpy(), expected, rtol=1e-5, atol=1e-7)


def test_sam_on_rejects_bad_variants():
    with pytest.raises(ValueError, match="p must be"):
        sam_on(rho=1.0, p=1)
    with pytest.raises(ValueError, match="layerwise applies"):
        sam_on(rho=1.0, layerwise=True)
    assert make_oracle("sam_on", rho=1.0, p="2", adaptive=True, layerwise=True).passes == 2


# --------------------------------------------------------------------------- Fisher-SAM
def test_fisher_sam_matches_closed_form():
    prob = Problem()
    rho, eta_f = 0.4, 2.0
    w = prob.w.double().numpy()
    g = prob.grad(w)
    f = 1.0 + eta_f * g**2
    e = rho * (g / f) / np.sqrt(np.sum(g**2 / f))
    _, g_f, _, _ = run(fisher_sam(rho=rho, eta_f=eta_f), prob)
    close(g_f, prob.grad(w + e))


# --------------------------------------------------------------------------- FedLESAM
def test_lesam_takes_one_pass_along_the_negative_previous_global_update():
    prob = Problem()
    rho = 0.5
    u = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    points = record_points(prob.model)
    oracle = lesam(rho=rho)
    _, g, _, _ = run(oracle, prob, prob.ctx(broadcast={"prev_global_update": u}))
    assert oracle.passes == 1
    assert len(points) == 1
    un = u.double().numpy()
    point = prob.w.double().numpy() - rho * un / np.linalg.norm(un)
    close(points[0], point)
    close(g, prob.grad(point))


@pytest.mark.parametrize("broadcast", [{}, {"prev_global_update": torch.zeros(5)}])
def test_lesam_without_a_global_direction_is_the_plain_gradient(broadcast):
    prob = Problem()
    _, g, _, _ = run(lesam(rho=0.5), prob, prob.ctx(broadcast=broadcast))
    _, g_plain = prob.model.loss_grad(prob.w, *prob.batch)
    assert torch.equal(g, g_plain)


# --------------------------------------------------------------------------- FedSMOO
def test_fedsmoo_corrects_the_ascent_and_its_finish_returns_the_dual():
    prob = Problem()
    rho = 0.3
    rng = np.random.default_rng(7)
    mu0, s = rng.normal(size=5) * 0.1, rng.normal(size=5) * 0.1
    oracle = fedsmoo(rho=rho)
    ctx = prob.ctx(
        broadcast={FEDSMOO_S: torch.tensor(s, dtype=torch.float32)},
        client_state={FEDSMOO_MU: torch.tensor(mu0, dtype=torch.float32)},
    )
    state = oracle.init(ctx)
    gen = stream(0, "client")
    w = prob.w.clone()
    w_np, mu = w.double().numpy(), mu0.copy()
    for _ in range(2):
        _, g, state, _ = oracle.grad(w, prob.batch, state, gen, ctx)
        g_hat = prob.grad(w_np) - (mu + s)
        e = rho * g_hat / np.linalg.norm(g_hat)
        mu = mu + e - s
        close(g, prob.grad(w_np + e), rtol=1e-4)
        w = w - 0.1 * g
        w_np = w.double().numpy()
    new_state, extras = oracle.finish(state, StepEnd(w, 2, 0.1, ctx))
    close(new_state[FEDSMOO_MU], mu, rtol=1e-4)
    assert torch.equal(extras[FEDSMOO_MU], new_state[FEDSMOO_MU])


# --------------------------------------------------------------------------- registry
def test_registry_builds_every_oracle_with_its_pass_count():
    expected = {
        "sgd": 1,
        "sam": 2,
        "asam": 2,
        "gam": 4,
        "sam_on": 2,
        "fisher_sam": 2,
        "lesam": 1,
    }
    params = {
        "sgd": {},
        "sam": {"rho": 0.05},
        "asam": {"rho": 0.5, "eta": 0.01},
        "gam": {
            "grad_rho": 0.03,
            "grad_norm_rho": 0.2,
            "beta0": 0.1,
            "beta1": 0.1,
            "gamma": 0.05,
        },
        "sam_on": {"rho": 1.0},
        "fisher_sam": {"rho": 0.1, "eta_f": 1.0},
        "lesam": {"rho": 0.5},
    }
    for name, passes in expected.items():
        assert make_oracle(name, **params[name]).passes == passes
    assert set(ORACLE_NAMES) == {*expected, "fedsmoo"}
    assert fedsmoo(rho=0.1).passes == 2


def test_registry_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="unknown oracle"):
        make_oracle("adam")
    with pytest.raises(ValueError, match="does not take"):
        make_oracle("sam", rho=0.1, eta=0.2)
    # FedSMOO's μ_i is its own state (an oracle with a finish), so it builds like the others.
    assert make_oracle("fedsmoo", rho=0.1).finish is not None
    with pytest.raises(ValueError, match=r"rho must be >= 0, got -0\.1"):
        make_oracle("sam", rho=-0.1)


def test_zero_gradient_gives_no_perturbation_instead_of_nan():
    prob = Problem()
    prob.x = torch.zeros_like(prob.x)  # zero inputs and targets: ∇L is exactly 0
    prob.y = torch.zeros_like(prob.y)
    oracles = (
        sam(rho=0.5, eps=0.0),
        asam(rho=0.5, eps=0.0),
        fisher_sam(rho=0.5, eps=0.0),
    )
    for oracle in oracles:
        points = record_points(prob.model)
        _, g, _, _ = run(oracle, prob)
        assert torch.equal(g, torch.zeros_like(g))
        assert torch.equal(points[1], prob.w)


def test_sam_on_variants_from_the_scenario_block():
    from pydantic import ValidationError

    from fedflat.runtime.build import local_rule_parts
    from fedflat.scenario.local_rule import CorrectionConfig, OracleConfig

    cfg = OracleConfig.model_validate({"name": "sam_on", "rho": 0.3, "p": "infinity"})
    oracle, _ = local_rule_parts(cfg, CorrectionConfig())
    model, _, g, e = _sam_on_epsilon(oracle)
    sel = model.mask(lambda s: s.name.startswith(("n1.", "n2.")))
    torch.testing.assert_close(e[sel], 0.3 * g[sel].sign(), rtol=1e-6, atol=1e-7)
    for block, match in (({"name": "sam", "p": "infinity"}, "sam_on only"),
                         ({"name": "sam_on", "layerwise": True}, "adaptive: true"),
                         ({"name": "sam_on", "p": 1}, "infinity")):
        with pytest.raises(ValidationError, match=match):
            OracleConfig.model_validate(block)


@pytest.mark.parametrize(("over", "key"), [({"p": "infinity"}, "client.oracle.p"),
                                           ({"adaptive": True, "layerwise": True},
                                            "client.oracle.layerwise")])
def test_vmap_backend_refuses_the_sam_on_variants_by_name(over, key):
    # The vectorised engine implements only the l2 / element-wise SAM-ON: the serial and
    # Ray backends run the variants, vmap must refuse rather than silently run l2.
    from conftest import tiny_scenario

    from fedflat.errors import ScenarioError
    from fedflat.scenario.loader import load_scenario

    sc = tiny_scenario(**{"runtime.backend": "vmap", "client.oracle": {"name": "sam_on", **over}})
    with pytest.raises(ScenarioError, match=key):
        load_scenario(sc)
