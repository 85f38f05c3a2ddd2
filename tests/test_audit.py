"""One-run privacy audit (Steinke, Nasr, Jagielski 2023) and the simulated canary mechanism.

The bound is checked against closed forms (all guesses right and δ = 0 gives
p(ε)^r = α) and against a direct evaluation of PRIVACY.md's formula; the mechanism-level
audit must pass a correct Gaussian mechanism at ε ≈ 1 and flag each injected fault.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedflat.privacy import (
    audit_gaussian_sum,
    canary_scores,
    clear_memory_cache,
    draw_inclusion,
    epsilon_lower_bound,
    epsilon_lower_bound_from_counts,
    epsilon_lower_bound_multi,
    noise_multiplier,
    simulate_gaussian_sum,
)
from fedflat.privacy.audit import audit_released, guess_counts
from fedflat.rng import stream


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFLAT_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()


def bound_direct(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """PRIVACY.md's P(ε), written out term by term."""
    p = math.exp(eps) / (1 + math.exp(eps))
    first = stats.binom.sf(v - 1, r, p)
    second = max(
        (stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i
        for i in range(1, v + 1)
    )
    return first + 2 * m * delta * second


# --------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("r", [10, 50, 400])
def test_all_correct_no_delta_closed_form(r):
    # P(ε) = p^r; the bound is where p^r = α, i.e. ε = logit(α^(1/r)).
    p = 0.05 ** (1 / r)
    expected = math.log(p / (1 - p))
    got = epsilon_lower_bound_from_counts(
        num_canaries=r, guesses=r, correct=r, delta=0.0
    )
    assert got == pytest.approx(expected, abs=1e-6)


def test_hand_checked_ten_guesses():
    # r = v = 10: p = 0.05^(1/10) = 0.74113, ε = log(p/(1-p)) = 1.0515.
    got = epsilon_lower_bound_from_counts(
        num_canaries=10, guesses=10, correct=10, delta=0.0
    )
    assert got == pytest.approx(1.0515, abs=1e-3)


@pytest.mark.parametrize(
    ("m", "r", "v"), [(1000, 400, 400), (1000, 400, 330), (200, 60, 50)]
)
def test_bound_sits_where_formula_crosses_alpha(m, r, v):
    delta, alpha = 1e-5, 0.05
    lb = epsilon_lower_bound_from_counts(
        num_canaries=m, guesses=r, correct=v, delta=delta
    )
    assert lb > 0
    assert bound_direct(lb, m, r, v, delta) < alpha
    assert bound_direct(lb + 1e-6, m, r, v, delta) >= alpha - 1e-9
    no_delta = epsilon_lower_bound_from_counts(
        num_canaries=m, guesses=r, correct=v, delta=0.0
    )
    assert lb < no_delta  # δ > 0 can only weaken the evidence


def test_bound_is_zero_for_chance_level_guessing():
    assert (
        epsilon_lower_bound_from_counts(
            num_canaries=1000, guesses=400, correct=200, delta=1e-5
        )
        == 0.0
    )
    assert (
        epsilon_lower_bound_from_counts(
            num_canaries=10, guesses=0, correct=0, delta=1e-5
        )
        == 0.0
    )
    # 4 of 4 right happens with probability 1/16 > α at ε = 0.
    assert (
        epsilon_lower_bound_from_counts(
            num_canaries=10, guesses=4, correct=4, delta=0.0
        )
        == 0.0
    )


def test_bound_increases_with_correct_guesses():
    lbs = [
        epsilon_lower_bound_from_counts(
            num_canaries=1000, guesses=200, correct=v, delta=1e-5
        )
        for v in (120, 150, 180, 200)
    ]
    assert all(a < b for a, b in itertools.pairwise(lbs))


def test_guess_counts_by_hand():
    scores = np.array([0.1, 5.0, -2.0, 3.0, 0.0, 4.0])
    included = np.array([False, True, False, False, True, True])
    # k+ = 2 highest: idx 1 (in), 5 (in) -> 2 right; k- = 2 lowest: idx 2 (out), 4 (in) -> 1.
    assert guess_counts(scores, included, k_plus=2, k_minus=2) == (4, 3)
    lb = epsilon_lower_bound(scores, included, k_plus=2, k_minus=2, delta=0.0)
    assert lb == epsilon_lower_bound_from_counts(
        num_canaries=6, guesses=4, correct=3, delta=0.0
    )


def test_bound_input_validation():
    s = np.zeros(5)
    inc = np.zeros(5, dtype=bool)
    with pytest.raises(ValueError, match="k_plus"):
        epsilon_lower_bound(s, inc, k_plus=3, k_minus=3, delta=1e-5)
    with pytest.raises(ValueError, match="boolean"):
        epsilon_lower_bound(s, inc.astype(int), k_plus=1, k_minus=1, delta=1e-5)
    with pytest.raises(ValueError, match="correct"):
        epsilon_lower_bound_from_counts(num_canaries=5, guesses=3, correct=4, delta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        epsilon_lower_bound_from_counts(
            num_canaries=5, guesses=3, correct=3, delta=0.0, alpha=1.0
        )


def test_multi_choice_splits_alpha():
    gen = stream(3, "audit", 9)
    inc = draw_inclusion(500, gen)
    scores = inc.astype(float) * 2.0 + torch.randn(500, generator=gen).numpy()
    choices = [(50, 50), (100, 100)]
    multi = epsilon_lower_bound_multi(
        scores, inc, choices=choices, delta=1e-5, alpha=0.05
    )
    singles = [
        epsilon_lower_bound(scores, inc, k_plus=a, k_minus=b, delta=1e-5, alpha=0.025)
        for a, b in choices
    ]
    assert multi == max(singles)
    assert multi <= max(
        epsilon_lower_bound(scores, inc, k_plus=a, k_minus=b, delta=1e-5, alpha=0.05)
        for a, b in choices
    )


# ----------------------------------------------------------------- simulated mechanism


def test_simulated_noise_sampling_and_clipping_statistics():
    gen = stream(0, "audit", 1)
    m, steps, q, c, sigma = 2000, 50, 0.2, 0.5, 1.5
    none = np.zeros(m, dtype=bool)
    rel = simulate_gaussian_sum(
        included=none,
        clip_norm=c,
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        generator=gen,
    )
    assert rel.shape == (steps, m)
    n = rel.numel()
    std = rel.std().item()
    # sample std of n Gaussians: relative standard error ≈ 1/sqrt(2n)
    assert abs(std / (sigma * c) - 1) < 5 / math.sqrt(2 * n)
    # Noise off: the signal shows the sampling rate and the clipped contribution exactly.
    every = np.ones(m, dtype=bool)
    sig = simulate_gaussian_sum(
        included=every,
        clip_norm=c,
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        generator=gen,
        canary_norm=3 * c,
        fault="noise_off",
    )
    vals = set(np.unique(sig.numpy()).tolist())
    assert vals <= {0.0, c}  # clipped to C, never 3C
    hits = int((sig > 0).sum())
    assert stats.binomtest(hits, n, q).pvalue > 1e-3
    unclipped = simulate_gaussian_sum(
        included=every,
        clip_norm=c,
        noise_multiplier=sigma,
        sampling_rate=q,
        steps=steps,
        generator=gen,
        fault="clipping_off",
    )
    assert (
        unclipped.abs() > 5 * c
    ).float().mean() > 0.5 * q  # 10C contributions appear


def test_same_stream_same_audit():
    kw = {
        "clip_norm": 1.0,
        "noise_multiplier": 3.0,
        "sampling_rate": 0.1,
        "steps": 20,
        "delta": 1e-5,
        "num_canaries": 300,
    }
    a = audit_gaussian_sum(generator=stream(5, "audit"), **kw)
    b = audit_gaussian_sum(generator=stream(5, "audit"), **kw)
    assert a == b


def test_canary_scores_and_audit_released():
    released = torch.tensor([[1.0, 0.0, 2.0], [1.0, -1.0, 0.0]])
    assert canary_scores(released).tolist() == [2.0, -1.0, 2.0]
    assert canary_scores(np.array([3.0, 1.0])).tolist() == [3.0, 1.0]
    res = audit_released(
        released,
        np.array([True, False, True]),
        claimed_epsilon=1.0,
        delta=0.0,
        k_plus=1,
        k_minus=1,
    )
    assert (res.guesses, res.correct, res.num_canaries) == (2, 2, 3)


# ------------------------------------------------------------------- end-to-end audits

Q, STEPS, M, DELTA = 0.1, 50, 1000, 1e-5


@pytest.fixture(scope="module")
def sigma_at_eps1():
    # σ whose PLD ε at (q=0.1, T=50, δ=1e-5) is 1: the claim is tight, not RDP-loose.
    return noise_multiplier(
        sampling_rate=Q,
        steps=STEPS,
        epsilon=1.0,
        delta=DELTA,
        accountant="pld",
        use_cache=False,
    )


def _audit(sigma, seed, fault=None):
    return audit_gaussian_sum(
        clip_norm=1.0,
        noise_multiplier=sigma,
        sampling_rate=Q,
        steps=STEPS,
        delta=DELTA,
        num_canaries=M,
        fault=fault,
        accountant="pld",
        generator=stream(seed, "audit"),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_mechanism_not_flagged(sigma_at_eps1, seed):
    res = _audit(sigma_at_eps1, seed)
    assert res.claimed_epsilon == pytest.approx(1.0, abs=0.01)
    assert not res.flagged
    assert res.epsilon_lower_bound < res.claimed_epsilon


@pytest.mark.parametrize(
    "fault", ["noise_off", "noise_scaled", "clipping_off", "sample_every_step"]
)
def test_each_fault_flagged(sigma_at_eps1, fault):
    res = _audit(sigma_at_eps1, 0, fault)
    assert res.flagged
    assert res.epsilon_lower_bound > res.claimed_epsilon
