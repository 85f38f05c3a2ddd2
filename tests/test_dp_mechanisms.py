"""Example-level DP oracles (fedflat.privacy.mechanisms) against independent facts.

Per-example gradients of softmax regression have the closed form (p − e_y) xᵀ, computed
here in float64 numpy; a GroupNorm CNN is checked against a Python loop of
single-example autograd, and both clipping modes against Opacus 1.6. Noise is checked
statistically (χ² interval on the sample variance), sampling by a binomial test on
``batch_indices``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from fedflat.client.optim import sgd
from fedflat.client.oracle_base import UpdateContext, plain
from fedflat.client.update import LocalRule, LocalSchedule, batch_indices, client_update
from fedflat.models import FlatModel, build_model
from fedflat.privacy.mechanisms import (
    DP_ORACLES,
    DPOracle,
    dp_sam,
    dp_sat,
    dp_sat_momentum,
    dp_sgd,
    history_entry,
    layer_clip_norms,
    per_example_grads,
    releases_per_step,
)

torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ctx_for(model: FlatModel, w: torch.Tensor, n: int = 1000) -> UpdateContext:
    return UpdateContext(model=model, x_global=w, round=0, client_id=0, num_samples=n)


def chi2_std_ok(x: torch.Tensor, std: float, alpha: float = 1e-4) -> bool:
    """Sample variance of iid N(0, std²) draws inside the two-sided χ² interval."""
    v = x.double().flatten().numpy()
    k = v.size
    stat = (v**2).sum() / std**2  # mean is known to be 0: χ²(k)
    lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], k)
    return bool(lo <= stat <= hi)


class Softmax:
    """Softmax regression with closed-form per-example gradients (float64 numpy)."""

    def __init__(self, d: int = 6, k: int = 3, b: int = 12, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.model = FlatModel(nn.Linear(d, k))
        w = rng.normal(size=self.model.num_params)
        self.w = torch.tensor(w, dtype=torch.float32)
        self.x = torch.tensor(rng.normal(size=(b, d)) * 2.0, dtype=torch.float32)
        self.y = torch.tensor(rng.integers(0, k, size=b))
        self.d, self.k = d, k

    def per_example(self) -> np.ndarray:
        """[B, d_flat] gradients (p − e_y) ⊗ [x, 1], in the model's flat layout."""
        wv = self.w.double().numpy()
        wm, bias = wv[: self.k * self.d].reshape(self.k, self.d), wv[self.k * self.d :]
        x = self.x.double().numpy()
        logits = x @ wm.T + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p.copy()
        r[np.arange(len(x)), self.y.numpy()] -= 1.0  # [B, k]
        gw = r[:, :, None] * x[:, None, :]  # [B, k, d]
        return np.concatenate([gw.reshape(len(x), -1), r], axis=1)


def flat_pe(model: FlatModel, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    grads, losses = per_example_grads(model, w, x, y)
    b = len(y)
    return torch.cat([grads[s.name].reshape(b, -1) for s in model.segments], 1), losses


# --------------------------------------------------------------------------- gradients
def test_per_example_grads_match_closed_form():
    p = Softmax()
    g, _ = flat_pe(p.model, p.w, p.x, p.y)
    np.testing.assert_allclose(
        g.double().numpy(), p.per_example(), rtol=1e-4, atol=1e-6
    )


def test_per_example_grads_match_single_example_loop_on_groupnorm_cnn():
    model = FlatModel(build_model("cnn", (1, 8, 8), 4, channels=(4, 8), hidden=(16,),
                                  norm="group", groups=2))
    w = model.init_params(gen(1))
    x = torch.randn(5, 1, 8, 8, generator=gen(2))
    y = torch.tensor([0, 1, 2, 3, 1])
    g, losses = flat_pe(model, w, x, y)
    for j in range(5):  # reference: ordinary autograd on a batch of one
        loss_j, g_j = model.loss_grad(w, x[j : j + 1], y[j : j + 1])
        torch.testing.assert_close(g[j], g_j, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses[j], loss_j)


def test_no_noise_no_clip_equals_mean_gradient():
    model = FlatModel(build_model("mlp", (10,), 3, hidden=(8,)))
    w = model.init_params(gen(0))
    x = torch.randn(16, 10, generator=gen(1))
    y = torch.randint(0, 3, (16,), generator=gen(2))
    o = dp_sgd(clip_norm=math.inf, noise_multiplier=0.0, expected_batch_size=16)
    c = ctx_for(model, w)
    loss, g, _, m = o.grad(w, (x, y), o.init(c), gen(), c)
    ref_loss, ref_g = model.loss_grad(w, x, y)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, ref_loss)
    assert m["dp_frac_clipped"] == 0.0
    assert m["dp_batch_size"] == 16.0


@pytest.mark.parametrize("clip", [0.05, 0.5, 5.0])
def test_clipped_sum_matches_numpy_and_divides_by_expected_size(clip):
    p = Softmax(b=12)
    ref = p.per_example()
    norms = np.linalg.norm(ref, axis=1)
    # divided by L = 20, not by the 12 examples present
    expected = (ref * np.minimum(1.0, clip / norms)[:, None]).sum(0) / 20.0
    o = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=20)
    c = ctx_for(p.model, p.w)
    _, g, _, m = o.grad(p.w, (p.x, p.y), o.init(c), gen(), c)
    np.testing.assert_allclose(g.double().numpy(), expected, rtol=1e-4, atol=1e-7)
    assert m["dp_frac_clipped"] == pytest.approx(float((norms > clip).mean()))
    assert m["dp_grad_norm"] == pytest.approx(float(norms.mean()), rel=1e-4)


def test_each_example_clipped_to_bound_flat_and_per_layer():
    p = Softmax(b=8)
    ref = p.per_example()
    c = ctx_for(p.model, p.w)
    clip = 0.3
    bounds = layer_clip_norms(p.model.segments, clip, "equal")
    assert sum(b * b for b in bounds) == pytest.approx(clip**2)
    flat = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=1)
    layer = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=1,
                   per_layer=True)
    for j in range(8):  # a batch of one example: the output IS its clipped gradient
        batch = (p.x[j : j + 1], p.y[j : j + 1])
        _, g, _, _ = flat.grad(p.w, batch, flat.init(c), gen(), c)
        n_j = np.linalg.norm(ref[j])
        assert float(g.norm()) <= clip * (1 + 1e-6)
        assert float(g.norm()) == pytest.approx(min(n_j, clip), rel=1e-5)
        # direction unchanged
        np.testing.assert_allclose(g.double().numpy() * n_j / float(g.norm()), ref[j],
                                   rtol=1e-4, atol=1e-6)
        _, gl, _, _ = layer.grad(p.w, batch, layer.init(c), gen(), c)
        for s, b in zip(p.model.segments, bounds, strict=True):
            seg_ref = np.linalg.norm(ref[j, s.slice])
            assert float(gl[s.slice].norm()) == pytest.approx(min(seg_ref, b), rel=1e-5)
        assert float(gl.norm()) <= clip * (1 + 1e-6)


def test_numel_layer_split_sums_to_clip():
    model = FlatModel(build_model("mlp", (10,), 3, hidden=(8,)))
    bounds = layer_clip_norms(model.segments, 2.0, "numel")
    assert sum(b * b for b in bounds) == pytest.approx(4.0)
    assert bounds[0] > bounds[1]  # the 8x10 weight gets more than its 8-bias


def test_zero_gradient_examples_are_safe():
    model = FlatModel(nn.Linear(4, 2))
    w = torch.zeros(model.num_params)
    x = torch.zeros(3, 4)
    y = torch.tensor([0, 1, 0])
    # A loss with zero gradient everywhere: it ignores the logits.
    model.loss_fn = lambda out, target: (out * 0.0).sum()
    o = dp_sgd(clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=3)
    c = ctx_for(model, w)
    _, g, _, m = o.grad(w, (x, y), o.init(c), gen(), c)
    assert torch.all(g == 0)
    assert m["dp_grad_norm"] == 0.0
    assert m["dp_frac_clipped"] == 0.0


# ----------------------------------------------------------------------------- noise
def test_noise_std_is_sigma_c_over_expected_batch_size():
    p = Softmax(d=50, k=40, b=10)  # d_flat = 2040 coordinates per draw
    sigma, clip, big_l = 1.7, 0.4, 25
    noisy = dp_sgd(clip_norm=clip, noise_multiplier=sigma, expected_batch_size=big_l)
    clean = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=big_l)
    c = ctx_for(p.model, p.w)
    _, g0, _, _ = clean.grad(p.w, (p.x, p.y), clean.init(c), gen(), c)
    diffs = []
    for seed in range(5):
        _, g, _, _ = noisy.grad(p.w, (p.x, p.y), noisy.init(c), gen(seed), c)
        diffs.append(g - g0)
    noise = torch.stack(diffs)
    assert chi2_std_ok(noise, sigma * clip / big_l)
    # independent draws across seeds, not one shared vector
    assert abs(float(np.corrcoef(noise[0].numpy(), noise[1].numpy())[0, 1])) < 0.1


def test_noise_is_one_draw_of_d_normals_from_the_generator():
    p = Softmax()
    o = dp_sgd(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    c = ctx_for(p.model, p.w)
    g_used, g_ref = gen(7), gen(7)
    _, g, _, _ = o.grad(p.w, (p.x, p.y), o.init(c), g_used, c)
    torch.randn(p.model.num_params, generator=g_ref)
    assert torch.equal(g_used.get_state(), g_ref.get_state())
    _, g2, _, _ = o.grad(p.w, (p.x, p.y), o.init(c), gen(7), c)
    _, g3, _, _ = o.grad(p.w, (p.x, p.y), o.init(c), gen(8), c)
    assert torch.equal(g, g2)
    assert not torch.equal(g, g3)


def test_empty_batch_gives_pure_noise_over_expected_size():
    p = Softmax(d=40, k=50, b=4)
    sigma, clip, big_l = 1.3, 0.7, 8
    o = dp_sgd(clip_norm=clip, noise_multiplier=sigma, expected_batch_size=big_l)
    c = ctx_for(p.model, p.w)
    empty = (p.x[:0], p.y[:0])
    loss, g, _, m = o.grad(p.w, empty, o.init(c), gen(3), c)
    assert math.isnan(float(loss))
    assert all(math.isfinite(v) for v in m.values())
    assert m["dp_batch_size"] == 0.0
    assert chi2_std_ok(g, sigma * clip / big_l)
    quiet = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=big_l)
    _, g0, _, _ = quiet.grad(p.w, empty, quiet.init(c), gen(3), c)
    assert torch.all(g0 == 0)


def test_client_update_with_poisson_batches_and_empty_steps():
    model = FlatModel(build_model("logistic", (5,), 3))
    w0 = model.init_params(gen(0))
    x = torch.randn(30, 5, generator=gen(1))
    y = torch.randint(0, 3, (30,), generator=gen(2))
    # q = 1/30: about 36 % of the 40 steps draw an empty batch.
    rule = LocalRule(
        oracle=dp_sat(
            rho=0.05, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=1
        ),
        corrections=(), optimizer=sgd(momentum=0.9),
        schedule=LocalSchedule(batch_size=1, steps=40, batching="poisson"),
    )
    res = client_update(rule, ctx_for(model, w0, n=30), x, y, 0.1, gen(4))
    assert res.steps == 40
    assert torch.isfinite(res.delta).all()
    assert math.isfinite(res.train_loss)
    assert 0.0 < res.metrics["dp_batch_size"] < 3.0  # mean realised size ≈ 1


def test_expected_batch_size_never_exceeds_client_size_and_sampling_rate():
    p = Softmax(b=6)
    c = ctx_for(p.model, p.w, n=6)
    big = dp_sgd(clip_norm=math.inf, noise_multiplier=0.0, expected_batch_size=50)
    _, g, _, _ = big.grad(p.w, (p.x, p.y), big.init(c), gen(), c)
    # LocalSchedule's rate is min(1, 50/6) = 1: every batch is all 6, expected size 6.
    np.testing.assert_allclose(g.double().numpy(), p.per_example().mean(0), rtol=1e-4,
                               atol=1e-7)
    rate = dp_sgd(clip_norm=math.inf, noise_multiplier=0.0, sampling_rate=0.5)
    _, g2, _, _ = rate.grad(p.w, (p.x, p.y), rate.init(c), gen(), c)  # L = 0.5 * 6 = 3
    np.testing.assert_allclose(g2.double().numpy(), p.per_example().sum(0) / 3,
                               rtol=1e-4, atol=1e-7)


def test_poisson_sampling_rate_binomial():
    n, b, steps = 200, 10, 400
    sched = LocalSchedule(batch_size=b, steps=steps, batching="poisson")
    idx = list(batch_indices(n, sched, gen(11)))
    q = b / n
    sizes = np.array([len(i) for i in idx])
    assert stats.binomtest(int(sizes.sum()), n * steps, q).pvalue > 1e-4
    # each example independently: per-example counts ~ Bin(steps, q)
    counts = np.bincount(torch.cat(idx).numpy(), minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-4
    # batch sizes vary like Bin(n, q), not fixed
    var_ratio = sizes.var(ddof=1) / (n * q * (1 - q))
    assert 0.75 < var_ratio < 1.3
    tiny = LocalSchedule(batch_size=1, steps=200, batching="poisson")
    assert any(len(i) == 0 for i in batch_indices(50, tiny, gen(12)))


# ----------------------------------------------------------------------------- refusals
def test_batchnorm_is_refused_with_groupnorm_hint():
    model = FlatModel(build_model("cnn", (1, 8, 8), 3, channels=(4,), hidden=(8,),
                                  norm="batch"))
    o = dp_sgd(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)
    with pytest.raises(ValueError, match="GroupNorm"):
        o.init(ctx_for(model, model.get_params()))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0, "expected_batch_size": 4},
         "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": -1.0, "expected_batch_size": 4},
         "noise_multiplier"),
        ({"clip_norm": math.inf, "noise_multiplier": 1.0, "expected_batch_size": 4},
         "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0}, "expected_batch_size"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 0},
         "expected_batch_size"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "sampling_rate": 1.5},
         "sampling_rate"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_batch_size": 4,
          "layer_split": "bad"}, "layer_split"),
    ],
)
def test_factory_checks_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        dp_sgd(**kwargs)
    with pytest.raises(ValueError, match="rho"):
        dp_sat(rho=-0.1, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4)


# ------------------------------------------------------------------------ DP-SAT / SAM
def _run(o, model, w, batch, state, seed, c):
    return o.grad(w, batch, state, gen(seed), c)


def test_dp_sat_first_step_is_dp_sgd_then_perturbs_along_previous_release():
    p = Softmax(b=10)
    kw = {"clip_norm": 0.5, "noise_multiplier": 1.1, "expected_batch_size": 10}
    rho = 0.2
    sat, base = dp_sat(rho=rho, **kw), dp_sgd(**kw)
    c = ctx_for(p.model, p.w)
    batch = (p.x, p.y)
    _, g0, st, m0 = _run(sat, p.model, p.w, batch, sat.init(c), 5, c)
    _, r0, _, _ = _run(base, p.model, p.w, batch, base.init(c), 5, c)
    assert torch.equal(g0, r0)
    assert m0["dp_sat_perturbation"] == 0.0
    w1 = p.w - 0.1 * g0
    batch1 = (p.x[:6], p.y[:6])
    _, g1, _, m1 = _run(sat, p.model, w1, batch1, st, 6, c)
    eps = rho * r0.double() / r0.double().norm()
    wp = (w1.double() + eps).float()
    _, r1, _, _ = _run(base, p.model, wp, batch1, base.init(c), 6, c)
    torch.testing.assert_close(g1, r1, rtol=1e-5, atol=1e-6)
    assert m1["dp_sat_perturbation"] == rho


def test_dp_sat_momentum_perturbs_along_previous_displacement():
    p = Softmax(b=10)
    kw = {"clip_norm": 0.5, "noise_multiplier": 0.8, "expected_batch_size": 10}
    rho = 0.1
    o, base = dp_sat_momentum(rho=rho, **kw), dp_sgd(**kw)
    c = ctx_for(p.model, p.w)
    _, g0, st, _ = _run(o, p.model, p.w, (p.x, p.y), o.init(c), 1, c)
    _, r0, _, _ = _run(base, p.model, p.w, (p.x, p.y), base.init(c), 1, c)
    assert torch.equal(g0, r0)
    w_prev = p.w.clone()
    w1 = p.w.clone().sub_(0.3 * g0)  # in place, as the base optimizer does
    _, g1, _, _ = _run(o, p.model, w1, (p.x, p.y), st, 2, c)
    disp = (w_prev - w1).double()
    wp = (w1.double() + rho * disp / disp.norm()).float()
    _, r1, _, _ = _run(base, p.model, wp, (p.x, p.y), base.init(c), 2, c)
    torch.testing.assert_close(g1, r1, rtol=1e-5, atol=1e-6)


def test_dp_sam_without_noise_is_sam_on_the_clipped_mean():
    p = Softmax(b=10)
    clip, rho = 0.4, 0.3
    o = dp_sam(rho=rho, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=10)
    c = ctx_for(p.model, p.w)
    loss, g, _, _ = o.grad(p.w, (p.x, p.y), o.init(c), gen(), c)
    ref = p.per_example()
    gbar = (ref * np.minimum(1.0, clip / np.linalg.norm(ref, axis=1))[:, None]).mean(0)
    p2 = Softmax(b=10)
    p2.w = (p.w.double() + torch.tensor(rho * gbar / np.linalg.norm(gbar))).float()
    ref2 = p2.per_example()
    scale2 = np.minimum(1.0, clip / np.linalg.norm(ref2, axis=1))
    expected = (ref2 * scale2[:, None]).mean(0)
    np.testing.assert_allclose(g.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, p.model.loss_grad(p.w, p.x, p.y)[0])


def test_releases_per_step_and_accounting_multiplier():
    kw = {"clip_norm": 1.0, "noise_multiplier": 1.2, "expected_batch_size": 8}
    for name, factory in DP_ORACLES.items():
        o = factory(**kw) if name == "dp_sgd" else factory(rho=0.05, **kw)
        assert isinstance(o, DPOracle)
        k = 2 if name == "dp_sam" else 1
        assert releases_per_step(o) == k
        assert o.passes == k
        assert history_entry(o, sampling_rate=0.01, steps=30) == pytest.approx(
            (1.2 / math.sqrt(k), 0.01, 30))
    assert releases_per_step(plain()) == 0
    with pytest.raises(ValueError, match="DPOracle"):
        history_entry(plain(), sampling_rate=0.1, steps=1)


def test_dp_sam_noise_is_two_independent_draws():
    # Zero-gradient loss: the ascent release is pure noise, and so is the returned one.
    model = FlatModel(nn.Linear(30, 30))
    model.loss_fn = lambda out, target: (out * 0.0).sum()
    w = torch.zeros(model.num_params)
    sigma, clip, big_l = 2.0, 0.5, 4
    o = dp_sam(
        rho=0.1, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=big_l
    )
    c = ctx_for(model, w)
    batch = (torch.zeros(4, 30), torch.zeros(4, dtype=torch.long))
    g_used, g_ref = gen(9), gen(9)
    _, g, _, _ = o.grad(w, batch, o.init(c), g_used, c)
    first = torch.randn(model.num_params, generator=g_ref)
    second = torch.randn(model.num_params, generator=g_ref)
    torch.testing.assert_close(g, second * sigma * clip / big_l)
    assert not torch.allclose(first, second)
    assert torch.equal(g_used.get_state(), g_ref.get_state())


# --------------------------------------------------------------------------- vs Opacus
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("per_layer", [False, True])
def test_matches_opacus_privatised_gradient_without_noise(per_layer):
    """Opacus 1.6's DPOptimizer (an independent implementation) on a GroupNorm CNN."""
    opacus = pytest.importorskip("opacus")
    model = FlatModel(build_model("cnn", (1, 8, 8), 4, channels=(4, 8), hidden=(16,),
                                  norm="group", groups=2))
    w = model.init_params(gen(1))
    x = torch.randn(12, 1, 8, 8, generator=gen(2))
    y = torch.randint(0, 4, (12,), generator=gen(3))
    clip, big_l = 0.05, 16  # small clip so that most examples are clipped
    module = build_model("cnn", (1, 8, 8), 4, channels=(4, 8), hidden=(16,),
                         norm="group", groups=2)
    with torch.no_grad():
        for name, prm in module.named_parameters():
            prm.copy_(model.unflatten(w)[name])
    gsm = opacus.GradSampleModule(module)
    bounds = layer_clip_norms(model.segments, clip) if per_layer else clip
    optimizers = opacus.optimizers
    opt = optimizers.DPPerLayerOptimizer if per_layer else optimizers.DPOptimizer
    dpo = opt(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
              max_grad_norm=bounds, expected_batch_size=big_l)
    nn.functional.cross_entropy(gsm(x), y).backward()
    dpo.pre_step()
    ref = torch.cat([prm.grad.reshape(-1) for prm in gsm.parameters()])
    o = dp_sgd(clip_norm=clip, noise_multiplier=0.0, expected_batch_size=big_l,
               per_layer=per_layer)
    c = ctx_for(model, w)
    _, g, _, m = o.grad(w, (x, y), o.init(c), gen(), c)
    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-7)
    assert m["dp_frac_clipped"] > 0.5


def test_dp_oracle_attributes_survive_cloudpickle():
    cloudpickle = pytest.importorskip("cloudpickle")
    o = dp_sam(rho=0.1, clip_norm=1.0, noise_multiplier=1.3, expected_batch_size=4)
    back = cloudpickle.loads(cloudpickle.dumps(o))
    assert isinstance(back, DPOracle)
    assert releases_per_step(back) == 2
    assert back.accounting_noise_multiplier == pytest.approx(1.3 / math.sqrt(2))
