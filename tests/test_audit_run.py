"""One-run audits of real scenarios: correct mechanisms pass, broken ones are flagged."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import yaml
from conftest import tiny_scenario

from fedflat.audit.cli import register
from fedflat.audit.scenario_audit import (
    AuditInputError,
    audit_scenario,
    canary_block,
    canary_model,
    max_adaptive_clip,
)
from fedflat.errors import FedflatError
from fedflat.privacy.audit import FAULTS
from fedflat.privacy.mechanisms import per_example_grads
from fedflat.runtime.build import build_data
from fedflat.scenario.loader import load_scenario

M = 1000  # canaries: r = 400 guesses can certify ε up to ~4


def sample_level(**over):
    # Smallest client n≈50, batch 5 → q≈0.1, ~9 steps × 5 participations; σ for ε = 1.
    return tiny_scenario(**{"privacy.sample_level": {"enabled": True, "epsilon": 1.0,
                                                     "delta": 1e-5, "clip_norm": 1.0},
                            "server.rounds": 6, "client.batch_size": 5, **over})


def user_level(**user):
    # q = 0.1 per round, 30 rounds; z for ε = 1.
    return tiny_scenario(**{"privacy.user_level": {"enabled": True, "epsilon": 1.0,
                                                   "delta": 1e-5, "clip_norm": 1.0, **user},
                            "server.sampling": "poisson", "server.sampling_rate": 0.1,
                            "server.rounds": 30})


def test_canary_gradient_is_c_times_e_i_and_real_examples_never_touch_the_block():
    sc = load_scenario(sample_level()).scenario
    fed = build_data(sc)
    model, w = canary_model(sc, fed, num_canaries=7, canary_norm=3.0)
    block = canary_block(model)
    k = fed.dataset.num_classes
    x_real = fed.dataset.x_train[:4]
    x = torch.cat([x_real, torch.zeros(2, *x_real.shape[1:])])
    y = torch.cat([fed.dataset.y_train[:4], torch.tensor([k + 2, k + 5])])
    grads, _ = per_example_grads(model, w, x, y)
    g = torch.cat([grads[s.name].reshape(6, -1) for s in model.segments], 1)  # [B, d]
    expected = torch.zeros(2, 7)
    expected[0, 2] = expected[1, 5] = 3.0
    assert torch.equal(g[4:, block], expected)  # canary i: exactly c·e_i in the block
    rest = torch.ones(g.shape[1], dtype=torch.bool)
    rest[block] = False
    assert torch.count_nonzero(g[4:][:, rest]) == 0  # ... and nothing in the model
    assert torch.count_nonzero(g[:4, block]) == 0  # real examples never touch the block
    assert torch.count_nonzero(g[:4][:, rest]) > 0


def test_sample_level_correct_mechanism_is_not_flagged():
    res = audit_scenario(sample_level(), canaries=M)
    # σ was calibrated for ε = 1: the accountant's claim is just under 1.
    assert 0.95 <= res.claimed_epsilon <= 1.0 + 1e-9
    assert res.level == "sample"
    assert res.mechanism == "dp_sgd"
    assert not res.flagged
    assert res.epsilon_lower_bound < res.claimed_epsilon
    assert res.guesses == 2 * (M // 5)
    assert 0 < res.num_included < M
    # With δ = 0, r guesses all right certify logit(α^(1/r)); δ > 0 only lowers it.
    p = 0.05 ** (1 / res.guesses)
    assert res.epsilon_lower_bound <= res.max_certifiable_epsilon <= math.log(p / (1 - p))


@pytest.mark.parametrize("fault", FAULTS)
def test_sample_level_faults_are_flagged(fault):
    res = audit_scenario(sample_level(), canaries=M, fault=fault)
    assert res.flagged
    assert res.epsilon_lower_bound > 1.2
    assert 0.95 <= res.claimed_epsilon <= 1.0 + 1e-9  # the claim ignores the fault


@pytest.mark.parametrize("mechanism", ["dp_sat", "dp_sam"])
def test_sample_level_variants_pass_and_noise_off_is_caught(mechanism):
    sc = sample_level(**{"privacy.sample_level.mechanism": mechanism})
    ok = audit_scenario(sc, canaries=M)
    assert ok.mechanism == mechanism
    assert not ok.flagged
    assert audit_scenario(sc, canaries=M, fault="noise_off").flagged


def test_user_level_correct_mechanism_is_not_flagged():
    res = audit_scenario(user_level(), canaries=M)
    assert res.level == "user"
    assert res.mechanism == "dp_fedavg"
    assert 0.95 <= res.claimed_epsilon <= 1.0 + 1e-9
    assert res.steps == 30
    assert res.sampling_rate == pytest.approx(0.1)
    assert not res.flagged


@pytest.mark.parametrize("fault", FAULTS)
def test_user_level_faults_are_flagged(fault):
    res = audit_scenario(user_level(), canaries=M, fault=fault)
    assert res.flagged
    assert res.epsilon_lower_bound > 1.2


@pytest.mark.parametrize("fault", [None, "clipping_off", "noise_scaled"])
def test_adaptive_clipping_audit(fault):
    res = audit_scenario(user_level(adaptive_clipping={"enabled": True, "count_noise": 5.0}),
                         canaries=M, fault=fault)
    assert res.mechanism == "adaptive_clipping"
    assert res.flagged == (fault is not None)


def test_max_adaptive_clip_bounds_the_clip_growth():
    sc = load_scenario(user_level(adaptive_clipping={"enabled": True, "count_noise": 5.0,
                                                     "initial_clip": 0.1})).scenario
    # b̄ ∈ [0, 1]: at most exp(η_C·γ) per round = exp(0.2·0.5·30) over 30 rounds.
    assert max_adaptive_clip(sc) == pytest.approx(0.1 * torch.exp(torch.tensor(3.0)).item())


def test_bad_input_is_a_fedflat_error():
    with pytest.raises(AuditInputError, match="canaries"):
        audit_scenario(sample_level(), canaries=1)
    with pytest.raises(ValueError, match="fault"):
        audit_scenario(sample_level(), canaries=10, fault="noise_missing")
    with pytest.raises(FedflatError, match="no DP mechanism"):
        audit_scenario(tiny_scenario(), canaries=10)
    both = sample_level(**{"privacy.user_level": {"enabled": True, "noise_multiplier": 1.0},
                           "server.sampling": "poisson"})
    with pytest.raises(FedflatError, match="level"):
        audit_scenario(both, canaries=10)


def _cli(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(prog="fedflat")
    handlers: dict = {}
    register(parser.add_subparsers(dest="command", required=True), handlers)
    return parser.parse_args(argv), handlers


def test_cli_json_output(tmp_path, capsys):
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(user_level()))
    args, handlers = _cli(["audit", str(path), "--canaries", "200", "--json",
                           "--set", "server.rounds=20"])
    code = handlers["audit"](args)
    out = json.loads(capsys.readouterr().out)
    assert code == (1 if out["flagged"] else 0)
    for key in ("level", "mechanism", "epsilon_lower_bound", "claimed_epsilon", "flagged",
                "delta", "alpha", "num_canaries", "guesses", "correct", "noise_multiplier",
                "sampling_rate", "steps", "clip_norm", "canary_norm", "fault", "notes",
                "max_certifiable_epsilon"):
        assert key in out
    assert out["num_canaries"] == 200
    assert out["steps"] == 20
    assert out["fault"] is None
    assert out["epsilon_lower_bound"] <= out["max_certifiable_epsilon"]


def test_a_claim_beyond_reach_of_the_audit_is_said(tmp_path):
    res = audit_scenario(user_level(epsilon=8.0, delta=1e-3), canaries=200)
    assert res.claimed_epsilon > res.max_certifiable_epsilon
    assert not res.flagged
    assert any("cannot refute" in n for n in res.notes)


def test_cli_text_output_and_exit_code_of_a_fault(tmp_path, capsys):
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(user_level()))
    args, handlers = _cli(["audit", str(path), "--canaries", str(M), "--fault", "noise_off"])
    assert handlers["audit"](args) == 1
    text = capsys.readouterr().out
    assert "FLAGGED" in text
    assert "claimed ε" in text
