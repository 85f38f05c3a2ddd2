"""Privacy inside real runs: calibrated budgets are respected and enforced, ε is logged."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_scenario

import fedflat
from fedflat.errors import ScenarioError
from fedflat.privacy import epsilon as eps_of


def test_sample_level_budget_is_calibrated_logged_and_never_exceeded(tmp_path):
    sc = tiny_scenario(**{"privacy.sample_level": {"enabled": True, "epsilon": 3.0, "delta": 1e-5,
                                                   "clip_norm": 1.0},
                          "server.rounds": 6})
    res = fedflat.run(sc, out=tmp_path / "r")
    info = json.loads((res.run_dir / "privacy.json").read_text())
    per_client = info["sample_level"]["epsilon_per_client"]
    assert len(per_client) == 12
    assert max(per_client) <= 3.0
    last = res.metrics[-1]
    assert last["epsilon_sample_max"] == pytest.approx(max(per_client))
    assert all(m["epsilon_sample_max"] <= 3.0 for m in res.metrics)
    eps = [m["epsilon_sample_max"] for m in res.metrics]
    assert eps == sorted(eps)


def test_client_over_budget_is_left_out(tmp_path):
    # σ fixed and a cap that admits only a few participations: later ones are refused.
    sc = tiny_scenario(**{"privacy.sample_level": {"enabled": True, "noise_multiplier": 1.0,
                                                   "epsilon": 2.0, "delta": 1e-5},
                          "server.rounds": 8})
    res = fedflat.run(sc, out=tmp_path / "r")
    refused = [c for m in res.metrics for c in m["budget_exhausted"]]
    assert refused, "some client must hit its cap"
    assert all(m["epsilon_sample_max"] <= 2.0 for m in res.metrics)
    for m in res.metrics:
        assert not set(m["budget_exhausted"]) & set(m["clients"])


def test_user_level_epsilon_matches_the_accountant_and_run_stops_at_the_cap(tmp_path):
    z, q, delta = 2.0, 4 / 12, 1e-3
    sc = tiny_scenario(**{"privacy.user_level": {"enabled": True, "noise_multiplier": z,
                                                 "epsilon": 3.0, "delta": delta, "clip_norm": 0.5},
                          "server.sampling": "poisson", "server.rounds": 40})
    res = fedflat.run(sc, out=tmp_path / "r")
    assert res.summary["status"] == "budget_exhausted"
    t = len(res.metrics)
    assert 0 < t < 40
    assert res.metrics[-1]["epsilon_user"] == pytest.approx(
        eps_of(sampling_rate=q, steps=t, noise_multiplier=z, delta=delta), rel=1e-6)
    assert eps_of(sampling_rate=q, steps=t + 1, noise_multiplier=z, delta=delta) > 3.0
    assert (res.run_dir / "final_model.pt").exists()
    assert "stopped" in res.summary


def test_user_level_needs_poisson_sampling(tmp_path):
    sc = tiny_scenario(**{"privacy.user_level": {"enabled": True, "epsilon": 1.0}})
    with pytest.raises(ScenarioError, match=r"server\.sampling"):
        fedflat.run(sc, out=tmp_path / "r")


def test_impossible_budget_is_a_clear_error(tmp_path):
    sc = tiny_scenario(**{"privacy.sample_level": {"enabled": True, "epsilon": 1e-4}})
    with pytest.raises(ScenarioError, match="privacy"):
        fedflat.run(sc, out=tmp_path / "r")


@pytest.mark.parametrize("mechanism", ["dp_sgd", "dp_sat", "dp_sam"])
def test_dp_mechanisms_run_and_resume_exactly(tmp_path, mechanism):
    sc = tiny_scenario(**{"privacy.sample_level": {"enabled": True, "noise_multiplier": 1.0,
                                                   "mechanism": mechanism},
                          "server.rounds": 5, "output.keep_checkpoints": 10})
    ref = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    for p in (again.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 2:
            p.unlink()
    (again.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, ref.params)
    assert resumed.metrics[-1]["epsilon_sample_max"] == ref.metrics[-1]["epsilon_sample_max"]


def test_empty_poisson_cohort_still_gets_user_level_noise(tmp_path):
    # q tiny: most rounds are empty; with user-level DP the model must still move (noise).
    sc = tiny_scenario(**{"privacy.user_level": {"enabled": True, "noise_multiplier": 1.0,
                                                 "clip_norm": 0.5},
                          "server.sampling": "poisson", "server.sampling_rate": 0.01,
                          "server.rounds": 3, "output.checkpoint_every": 1,
                          "output.keep_checkpoints": 5})
    res = fedflat.run(sc, out=tmp_path / "r")
    assert [len(m["clients"]) for m in res.metrics] == [0, 0, 0]
    ckpts = sorted((res.run_dir / "checkpoints").iterdir())
    p1 = torch.load(ckpts[0], weights_only=False)["server"]["params"]
    p2 = torch.load(ckpts[1], weights_only=False)["server"]["params"]
    assert not torch.equal(p1, p2)
