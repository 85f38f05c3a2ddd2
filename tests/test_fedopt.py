"""Adaptive server optimizers against hand computations, and server SWA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedflat.rng import stream
from fedflat.server.fedopt import fedadagrad, fedadam, fedyogi
from fedflat.server.pipeline import ServerRound
from fedflat.server.swa import swa_client_lr, swa_collects, swa_start_round, swa_step

AGGREGATES = [
    np.array([0.5, -1.0, 0.0, 2.0]),
    np.array([0.1, -0.2, 0.3, 1.0]),
    np.array([-0.4, 0.6, 0.0, -0.5]),
]
X0 = np.array([1.0, 2.0, -1.0, 0.0])


def run_steps(step, first_round: int = 0):
    x = torch.tensor(X0, dtype=torch.float64)
    state = step.init(x)
    for k, agg in enumerate(AGGREGATES):
        rnd = ServerRound(round=first_round + k, params=x, deltas=torch.zeros(1, 4),
                          weights=torch.ones(1), client_ids=[0], num_clients=1,
                          aggregate=torch.tensor(agg))
        rnd, state, _ = step.apply(rnd, state, stream(0, "server", k))
        x = rnd.new_params
    return x.numpy(), state


def hand(kind: str, lr, b1, b2, tau, bias, v0):
    """Reddi et al. Algorithm 2 in numpy (Keras bias correction if asked)."""
    x, m, v = X0.copy(), np.zeros(4), np.full(4, v0)
    for t, d in enumerate(AGGREGATES, start=1):
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d**2
        elif kind == "yogi":
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        else:
            v = v + d**2
        step = lr
        if bias:
            step = lr / (1 - b1**t)
            if kind != "adagrad":
                step *= math.sqrt(1 - b2**t)
        x = x + step * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("bias", [False, True])
def test_fedadam_matches_hand_computation(bias):
    step = fedadam(lr=0.3, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=bias)
    got, state = run_steps(step)
    expected = hand("adam", 0.3, 0.9, 0.99, 1e-3, bias, 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert state.count == 3


@pytest.mark.parametrize("bias", [False, True])
def test_fedyogi_matches_hand_computation(bias):
    step = fedyogi(lr=0.05, beta1=0.8, beta2=0.9, tau=1e-2, bias_correction=bias,
                   initial_accumulator=0.3)
    got, _ = run_steps(step)
    expected = hand("yogi", 0.05, 0.8, 0.9, 1e-2, bias, 0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_fedadagrad_matches_hand_computation(bias):
    step = fedadagrad(
        lr=0.1, beta1=0.5, tau=1e-2, bias_correction=bias, initial_accumulator=0.1
    )
    got, _ = run_steps(step)
    expected = hand("adagrad", 0.1, 0.5, 0.0, 1e-2, bias, 0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_first_fedadam_step_is_lr_times_sign_without_decay_memory():
    # With bias correction and τ → 0 Adam's first step is η·Δ/|Δ| (a classic Adam fact).
    one = fedadam(lr=0.01, tau=1e-12, bias_correction=True)
    rnd = ServerRound(
        round=0,
        params=torch.zeros(2, dtype=torch.float64),
        deltas=torch.zeros(1, 2),
        weights=torch.ones(1),
        client_ids=[0],
        num_clients=1,
        aggregate=torch.tensor([3.0, -0.5], dtype=torch.float64),
    )
    out, _, _ = one.apply(rnd, one.init(rnd.params), stream(0, "server"))
    np.testing.assert_allclose(out.new_params.numpy(), [0.01, -0.01], rtol=1e-9)


def test_bias_correction_uses_own_step_count_not_the_round_number():
    step = fedadam(lr=0.3, bias_correction=True)
    late, state = run_steps(step, first_round=500)
    early, _ = run_steps(step, first_round=0)
    np.testing.assert_array_equal(late, early)
    assert state.count == 3


def test_fedopt_rejects_bad_hyperparameters_and_missing_aggregate():
    with pytest.raises(ValueError, match="beta2 must be in"):
        fedadam(lr=0.1, beta2=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        fedyogi(lr=0.1, tau=0.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        fedadagrad(lr=0.0)
    step = fedadam(lr=0.1)
    rnd = ServerRound(round=0, params=torch.zeros(2), deltas=torch.zeros(1, 2),
                      weights=torch.ones(1), client_ids=[0], num_clients=1)
    with pytest.raises(ValueError, match="after the aggregation rule"):
        step.apply(rnd, step.init(rnd.params), stream(0, "server"))


# --------------------------------------------------------------------------- SWA
def test_swa_client_lr_decays_linearly_within_each_cycle():
    lrs = [
        swa_client_lr(r, base_lr=0.1, swa_lr=0.0, start_round=8, cycle=4)
        for r in range(16)
    ]
    assert lrs[:8] == [0.1] * 8
    np.testing.assert_allclose(lrs[8:12], [0.075, 0.05, 0.025, 0.0])
    np.testing.assert_allclose(lrs[12:16], [0.075, 0.05, 0.025, 0.0])


def test_swa_collection_rounds_for_both_conventions():
    def rounds(collect: str) -> list[int]:
        return [
            r
            for r in range(20)
            if swa_collects(r, start_round=8, cycle=4, collect=collect)
        ]

    low, official = rounds("lowest_lr"), rounds("official")
    assert low == [11, 15, 19]
    # The reference collects at r > start only (debcaldarola/fedsam models/main.py).
    assert official == [12, 16]
    # lowest_lr collects exactly the rounds trained at swa_lr
    for r in low:
        lr = swa_client_lr(r, base_lr=0.1, swa_lr=1e-4, start_round=8, cycle=4)
        assert lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    ("collect", "rounds"), [("lowest_lr", [5, 8]), ("official", [6, 9])]
)
def test_swa_step_averages_the_collected_global_models(collect, rounds):
    step = swa_step(start_round=3, cycle=3, collect=collect)
    state = step.init(torch.zeros(2))
    models = {r: torch.tensor([float(r), float(r * r)]) for r in range(10)}
    for r in range(10):
        rnd = ServerRound(round=r, params=torch.zeros(2), deltas=torch.zeros(1, 2),
                          weights=torch.ones(1), client_ids=[0], num_clients=1,
                          new_params=models[r])
        rnd, state, _ = step.apply(rnd, state, stream(0, "server", r))
        done = [q for q in rounds if q <= r]
        if done:
            expected = torch.stack([models[q] for q in done]).mean(0)
            torch.testing.assert_close(rnd.eval_params, expected)
        else:
            assert rnd.eval_params is None
    assert state.n == len(rounds)


def test_swa_start_resolution():
    assert swa_start_round(0.75, 10000) == 7500
    assert swa_start_round(7500, 10000) == 7500
    with pytest.raises(ValueError, match="fraction"):
        swa_start_round(1.5, 100)
    with pytest.raises(ValueError, match="collect"):
        swa_step(start_round=0, cycle=2, collect="highest")



def three_rounds_of_half(step) -> float:
    """x after three rounds of the constant pseudo-gradient 0.5, from x = 0."""
    x = torch.zeros(1, dtype=torch.float64)
    state = step.init(x)
    for k in range(3):
        rnd = ServerRound(round=k, params=x, deltas=torch.zeros(1, 1), weights=torch.ones(1),
                          client_ids=[0], num_clients=1,
                          aggregate=torch.tensor([0.5], dtype=torch.float64))
        rnd, state, _ = step.apply(rnd, state, stream(0, "server", k))
        x = rnd.new_params
    return float(x[0])


def test_fedadagrad_default_has_no_first_moment_closed_form():
    # Reddi et al. / Flower FedAdagrad: β1 = 0. Three rounds of a constant pseudo-gradient
    # Δ = 0.5, η = 0.1, τ = 1e-3 from x = 0: v_t = t Δ², x_3 = Σ_t η Δ / (√(t Δ²) + τ).
    from fedflat.runtime.build import build_fedopt
    from fedflat.scenario.local_rule import FedOptConfig

    expected = sum(0.1 * 0.5 / (math.sqrt(t * 0.25) + 1e-3) for t in (1, 2, 3))
    assert expected == pytest.approx(0.2281, abs=1e-4)
    from_scenario = build_fedopt("fedadagrad", lr=0.1, config=FedOptConfig(tau=1e-3))
    assert three_rounds_of_half(from_scenario) == pytest.approx(expected, rel=1e-12)
    assert three_rounds_of_half(fedadagrad(lr=0.1, tau=1e-3)) == pytest.approx(expected, rel=1e-12)
    # A user's β1 still wins: 0.9 on Adagrad gives the slow start (0.039, not 0.228).
    user = build_fedopt("fedadagrad", lr=0.1, config=FedOptConfig(beta1=0.9, tau=1e-3))
    assert three_rounds_of_half(user) == pytest.approx(0.039, abs=1e-3)
    # FedAdam keeps β1 = 0.9 when the key is left unset.
    unset = build_fedopt("fedadam", lr=0.1, config=FedOptConfig())
    explicit = build_fedopt("fedadam", lr=0.1, config=FedOptConfig(beta1=0.9))
    assert three_rounds_of_half(unset) == three_rounds_of_half(explicit)
