"""User-level DP server steps (fedflat.privacy.central) against independent facts."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedflat.client.uplink import UplinkContext, chain
from fedflat.models import FlatModel, build_model
from fedflat.privacy.central import (
    adaptive_clipping,
    capped_weights,
    clip_deltas,
    cohort_noise_topup,
    gaussian_sum_noise,
)
from fedflat.privacy.client_noise import client_noise_steps
from fedflat.server.optimizers import fedavg
from fedflat.server.pipeline import Pipeline, ServerRound
from fedflat.server.rules import rule_step

torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_round(deltas, weights=None, num_clients: int = 100) -> ServerRound:
    m, d = deltas.shape
    w = torch.ones(m) if weights is None else torch.as_tensor(weights).float()
    return ServerRound(round=0, params=torch.zeros(d), deltas=deltas, weights=w,
                       client_ids=list(range(m)), num_clients=num_clients)


def run_step(step, rnd, seed=0, state=None):
    st = step.init(rnd.params) if state is None else state
    return step.apply(rnd, st, gen(seed))


def chi2_std_ok(x: torch.Tensor, std: float, alpha: float = 1e-4) -> bool:
    v = x.double().flatten().numpy()
    stat = (v**2).sum() / std**2
    lo, hi = stats.chi2.ppf([alpha / 2, 1 - alpha / 2], v.size)
    return bool(lo <= stat <= hi)


def rows(norms, d=7, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(len(norms), d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return torch.tensor(u * np.asarray(norms)[:, None], dtype=torch.float32)


# ----------------------------------------------------------------------------- clipping
def test_clip_deltas_bounds_norms_keeps_directions_and_zeroes_nonfinite():
    norms = [0.5, 1.0, 3.0, 10.0, 0.0]
    x = rows(norms)
    x = torch.cat([x, torch.full((1, 7), float("nan"))])
    out, _, m = run_step(clip_deltas(clip_norm=2.0), make_round(x))
    got = out.deltas.norm(dim=1).numpy()
    np.testing.assert_allclose(got, [0.5, 1.0, 2.0, 2.0, 0.0, 0.0], rtol=1e-6)
    torch.testing.assert_close(out.deltas[:2], x[:2])
    cos = torch.nn.functional.cosine_similarity(out.deltas[2:4], x[2:4])
    torch.testing.assert_close(cos, torch.ones(2))
    assert m["dp/frac_clipped"] == pytest.approx(2 / 6)
    assert m["dp/num_nonfinite"] == 1.0
    assert m["dp/update_norm_mean"] == pytest.approx(np.mean(norms), rel=1e-5)


# --------------------------------------------------------------------------- DP-FedAvg
def test_unweighted_sum_over_expected_clients_without_noise():
    x = rows([0.3, 0.7, 1.0])
    step = gaussian_sum_noise(noise_multiplier=0.0, clip_norm=1.0, expected_clients=5)
    out, _, m = run_step(step, make_round(x, weights=[10, 1, 1]))
    # fixed denominator qN = 5 and equal weights, not the realised mean over 3
    np.testing.assert_allclose(out.aggregate.numpy(), x.numpy().sum(0) / 5, rtol=1e-6)
    assert m["dp/num_clients"] == 3.0


def test_noise_std_on_aggregate_is_z_s_over_qn():
    d, z, s, qn = 20000, 1.3, 0.8, 25.0
    step = gaussian_sum_noise(noise_multiplier=z, clip_norm=s, expected_clients=qn)
    out, _, m = run_step(step, make_round(torch.zeros(4, d)), seed=1)
    assert chi2_std_ok(out.aggregate, z * s / qn)
    assert m["dp/noise_std"] == pytest.approx(z * s / qn)
    again, _, _ = run_step(step, make_round(torch.zeros(4, d)), seed=1)
    other, _, _ = run_step(step, make_round(torch.zeros(4, d)), seed=2)
    assert torch.equal(out.aggregate, again.aggregate)
    assert not torch.equal(out.aggregate, other.aggregate)


def test_empty_cohort_gives_pure_noise():
    d, z, s, qn = 5000, 1.0, 2.0, 10.0
    step = gaussian_sum_noise(noise_multiplier=z, clip_norm=s, expected_clients=qn)
    out, _, _ = run_step(step, make_round(torch.zeros(0, d)))
    assert chi2_std_ok(out.aggregate, z * s / qn)


def test_weighted_estimator_closed_form():
    x = rows([0.5, 1.0, 0.9, 0.2])
    n = np.array([5.0, 50.0, 20.0, 1.0])
    cap, total_w, n_pop, qn = 10.0, 37.5, 100, 4.0
    step = gaussian_sum_noise(noise_multiplier=0.0, clip_norm=1.0, expected_clients=qn,
                              weight_cap=cap, total_weight=total_w)
    out, _, m = run_step(step, make_round(x, weights=n, num_clients=n_pop))
    wk = np.minimum(n / cap, 1.0)
    expected = (wk[:, None] * x.double().numpy()).sum(0) / ((qn / n_pop) * total_w)
    np.testing.assert_allclose(out.aggregate.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(capped_weights(torch.tensor(n), cap).numpy(), wk)
    noisy = gaussian_sum_noise(noise_multiplier=2.0, clip_norm=1.0, expected_clients=qn,
                               weight_cap=cap, total_weight=total_w)
    _, _, m = run_step(noisy, make_round(x, weights=n, num_clients=n_pop))
    assert m["dp/noise_std"] == pytest.approx(2.0 / ((qn / n_pop) * total_w))


def test_gaussian_sum_noise_refuses_unclipped_rows_and_double_aggregation():
    step = gaussian_sum_noise(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3)
    with pytest.raises(ValueError, match="clip_deltas"):
        run_step(step, make_round(rows([0.5, 1.5])))
    rnd = make_round(rows([0.5, 0.5])).with_(aggregate=torch.zeros(7))
    with pytest.raises(ValueError, match="aggregat"):
        run_step(step, rnd)
    with pytest.raises(ValueError, match="total_weight"):
        gaussian_sum_noise(noise_multiplier=1.0, clip_norm=1.0, expected_clients=3,
                           weight_cap=2.0)
    with pytest.raises(ValueError, match="expected_clients"):
        gaussian_sum_noise(noise_multiplier=1.0, clip_norm=1.0, expected_clients=0)


def test_pipeline_clip_noise_optimizer():
    x = rows([0.4, 5.0, 9.0], d=7)
    pipe = Pipeline([clip_deltas(clip_norm=1.0),
                     gaussian_sum_noise(noise_multiplier=0.0, clip_norm=1.0,
                                        expected_clients=4),
                     fedavg(lr=1.0)])
    rnd = make_round(x)
    out, _, m = pipe.apply(rnd, pipe.init(rnd.params), gen())
    xs = x.double().numpy()
    clipped = xs * np.minimum(1.0, 1.0 / np.linalg.norm(xs, axis=1))[:, None]
    np.testing.assert_allclose(out.new_params.numpy(), clipped.sum(0) / 4, rtol=1e-5)
    assert m["dp/frac_clipped"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- adaptive
def _adaptive_run(gamma, rounds=300, m=100, seed=0, c0=0.1, **kw):
    step = adaptive_clipping(initial_clip=c0, target_quantile=gamma, clip_lr=0.2,
                             count_noise=kw.pop("count_noise", 0.01),
                             noise_multiplier=kw.pop("noise_multiplier", 0.0),
                             expected_clients=m, **kw)
    rng = np.random.default_rng(seed)
    state = step.init(torch.zeros(5))
    history = []
    for t in range(rounds):
        norms = rng.uniform(0.0, 10.0, size=m)
        x = rows(norms, d=5, seed=t)
        _, state, metrics = step.apply(make_round(x), state, gen(t))
        history.append(metrics["dp/clip_norm_next"])
    return np.array(history), state


@pytest.mark.parametrize("gamma", [0.5, 0.8])
def test_adaptive_clip_converges_to_target_quantile(gamma):
    hist, state = _adaptive_run(gamma)
    target = 10.0 * gamma  # γ-quantile of uniform(0, 10)
    assert abs(hist[-100:].mean() - target) < 0.08 * target
    assert float(state["clip_norm"]) == pytest.approx(hist[-1])


def test_adaptive_clip_arithmetic_update_also_tracks_quantile():
    hist, _ = _adaptive_run(0.5, rounds=400, c0=1.0, update="arithmetic")
    # arithmetic steps are η_C(b̄ − γ) ≤ 0.1 per round: 400 rounds go from 1 to 5
    assert abs(hist[-100:].mean() - 5.0) < 0.5


def test_adaptive_geometric_step_and_centred_bits_exact_without_count_noise():
    step = adaptive_clipping(initial_clip=2.0, target_quantile=0.3, clip_lr=0.2,
                             count_noise=0.0, noise_multiplier=0.0, expected_clients=8)
    x = rows([0.5, 1.0, 1.5, 3.0, 4.0, 5.0])  # 3 of 6 below C = 2
    out, state, m = run_step(step, make_round(x))
    # b̄ = (Σ(b − ½))/m + ½ = (3·½ − 3·½)/8 + ½ = 0.5 with the expected m = 8
    assert m["dp/unclipped_frac"] == pytest.approx(0.5)
    expected_clip = 2.0 * math.exp(-0.2 * (0.5 - 0.3))
    assert float(state["clip_norm"]) == pytest.approx(expected_clip)
    xs = x.double().numpy()
    clipped = xs * np.minimum(1.0, 2.0 / np.linalg.norm(xs, axis=1))[:, None]
    np.testing.assert_allclose(out.aggregate.numpy(), clipped.sum(0) / 8, rtol=1e-5)
    # all below: b̄ = (6·½)/8 + ½ = 0.875; all above: 0.125 — never outside [0, 1]
    _, _, m2 = run_step(step, make_round(rows([0.1] * 6)))
    _, _, m3 = run_step(step, make_round(rows([9.0] * 6)))
    assert m2["dp/unclipped_frac"] == pytest.approx(0.875)
    assert m3["dp/unclipped_frac"] == pytest.approx(0.125)


def test_adaptive_noise_split_std():
    z, m, d, c = 1.0, 100, 20000, 0.5
    sigma_b = m / 20
    step = adaptive_clipping(initial_clip=c, target_quantile=0.5, clip_lr=0.2,
                             count_noise=sigma_b, noise_multiplier=z,
                             expected_clients=m)
    out, _, metrics = run_step(step, make_round(torch.zeros(3, d)), seed=4)
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5  # Andrew et al. 2021, §4.4
    assert metrics["dp/update_noise_multiplier"] == pytest.approx(z_delta)
    assert chi2_std_ok(out.aggregate, z_delta * c / m)
    with pytest.raises(ValueError, match="count_noise"):
        adaptive_clipping(initial_clip=c, target_quantile=0.5, clip_lr=0.2,
                          count_noise=0.4, noise_multiplier=1.0, expected_clients=m)


def test_adaptive_state_survives_torch_save():
    _, state = _adaptive_run(0.5, rounds=3)
    buf = io.BytesIO()
    torch.save({"s": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf)["s"]
    assert float(loaded["clip_norm"]) == float(state["clip_norm"])


# --------------------------------------------------------------------------- DP-FedSAM
# The clip and the noise run in each client's uplink chain (fedflat.privacy.client_noise);
# these apply that chain to every row as the m clients would.
def client_rows(steps, x, seed=0):
    up = chain(*steps)
    return torch.stack([up.update(row, {}, UplinkContext(seed, 0, i))[0]
                        for i, row in enumerate(x)])


def test_local_noise_per_client_std_and_mean_std():
    m, d, c, sigma = 10, 4000, 0.5, 0.95
    steps = client_noise_steps(clip_norm=c, noise_multiplier=sigma, clients_per_round=m)
    out = make_round(client_rows(steps, torch.zeros(m, d), seed=3))
    assert chi2_std_ok(out.deltas, sigma * c / math.sqrt(m))
    mean = rule_step("mean", {}, weighting="uniform")
    agg, _, _ = run_step(mean, out)
    assert chi2_std_ok(agg.aggregate, sigma * c / m)  # = central DP-FedAvg on the mean


def test_small_cohort_gets_topped_up_to_the_accounted_multiplier():
    # Calibrated for m = 10 clients but only 4 arrive (a small Poisson draw): the sum of
    # their noise alone has std σC·√(4/10); after the top-up the released sum has σC.
    m, arrived, d, c, sigma = 10, 4, 20000, 0.5, 0.95
    steps = client_noise_steps(clip_norm=c, noise_multiplier=sigma, clients_per_round=m)
    out = make_round(client_rows(steps, torch.zeros(arrived, d), seed=5))
    agg, _, _ = run_step(rule_step("mean", {}, weighting="uniform"), out)
    assert chi2_std_ok(agg.aggregate * arrived, sigma * c * math.sqrt(arrived / m))
    topup = cohort_noise_topup(noise_multiplier=sigma, clip_norm=c, expected_clients=m)
    released, _, metrics = run_step(topup, agg, seed=6)
    assert chi2_std_ok(released.aggregate * arrived, sigma * c)
    assert metrics["dp/topup_std"] == pytest.approx(sigma * c * math.sqrt(1 - 0.4) / arrived)
    # a full (or larger) cohort is released as it is
    full = make_round(client_rows(steps, torch.zeros(m, d), seed=7))
    agg_full, _, _ = run_step(rule_step("mean", {}, weighting="uniform"), full)
    same, _, metrics = run_step(topup, agg_full, seed=8)
    assert torch.equal(same.aggregate, agg_full.aggregate)
    assert metrics["dp/topup_std"] == 0.0


def test_local_noise_clips_globally_or_per_tensor():
    model = FlatModel(build_model("mlp", (6,), 3, hidden=(5,)))
    d = model.num_params
    x = torch.randn(4, d, generator=gen(5)) * 3.0
    glob = client_noise_steps(clip_norm=1.0, noise_multiplier=0.0, clients_per_round=4)
    out = client_rows(glob, x)
    assert torch.all(out.norm(dim=1) <= 1.0 + 1e-5)
    # every row was longer than 1, so every row was clipped (to norm 1)
    assert torch.all(x.norm(dim=1) > 1.0)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    per = client_noise_steps(clip_norm=1.0, noise_multiplier=0.0, clients_per_round=4,
                             clip_scope="per_tensor", segments=model.segments)
    out = client_rows(per, x)
    for s in model.segments:
        blk, orig = out[:, s.slice], x[:, s.slice]
        expected = orig * torch.clamp(1.0 / orig.norm(dim=1, keepdim=True), max=1.0)
        torch.testing.assert_close(blk, expected)
    with pytest.raises(ValueError, match="segments"):
        client_noise_steps(clip_norm=1.0, noise_multiplier=1.0, clients_per_round=4,
                           clip_scope="per_tensor")
    with pytest.raises(ValueError, match="clip_scope"):
        client_noise_steps(clip_norm=1.0, noise_multiplier=1.0, clients_per_round=4,
                           clip_scope="layer")
