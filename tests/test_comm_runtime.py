"""Codecs and the system model inside real runs: bytes, stragglers, clock, resume."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_scenario

import fedflat

D = 60 * 10 + 10  # logistic regression on Synthetic: 60 features, 10 classes


def test_bytes_match_hand_computation(tmp_path):
    sc = tiny_scenario(**{"comm.uplink": {"codec": "top_k", "k": 61},
                          "comm.downlink": {"codec": "fp16"}, "server.rounds": 3})
    res = fedflat.run(sc, out=tmp_path / "r")
    up = 4 + 61 * 4 + 61 * 4   # header + fp32 values + int32 indices
    down = 4 + 2 * D           # header + fp16 values
    for i, m in enumerate(res.metrics, start=1):
        assert m["bytes_up"] == 4 * up
        assert m["bytes_down"] == 4 * down
        assert m["bytes_up_total"] == i * 4 * up
        assert m["bytes_down_total"] == i * 4 * down


def test_fp32_is_lossless_and_counts_full_vectors(tmp_path):
    a = fedflat.run(tiny_scenario(**{"server.rounds": 2}), out=tmp_path / "a")
    assert a.metrics[0]["bytes_up"] == 4 * (4 + 4 * D)


def test_deadline_drops_slow_clients_and_clock_is_exact(tmp_path):
    # compute speed 100 samples/s, no network cost: a client with n samples and E=1 needs n/100 s.
    sc = tiny_scenario(**{"system.compute_speed": 100.0, "system.deadline_s": 0.8,
                          "system.straggler_policy": "drop", "server.rounds": 3})
    res = fedflat.run(sc, out=tmp_path / "r")
    from fedflat.runtime.build import build_data
    from fedflat.scenario import load_scenario

    sizes = build_data(load_scenario(sc).scenario).client_sizes()
    for m in res.metrics:
        expect_late = sorted(c for c in m["participants"] if sizes[c] / 100.0 > 0.8)
        assert sorted(m["late"]) == expect_late
        assert sorted(m["clients"]) == sorted(set(m["participants"]) - set(expect_late))
        longest = max([sizes[c] / 100.0 for c in m["clients"]], default=0.0)
        assert m["round_sim_seconds"] == pytest.approx(0.8 if expect_late else longest)


def test_partial_policy_keeps_partial_work(tmp_path):
    sc = tiny_scenario(**{"system.compute_speed": 100.0, "system.deadline_s": 0.5,
                          "system.straggler_policy": "partial", "server.rounds": 2,
                          "client.local_epochs": 2})
    res = fedflat.run(sc, out=tmp_path / "r")
    assert all(not m["late"] or set(m["late"]) <= set(m["participants"]) for m in res.metrics)
    assert any(m["local_steps_mean"] < 2 * 12 for m in res.metrics)


def test_error_feedback_state_survives_resume(tmp_path):
    sc = tiny_scenario(**{"comm.uplink": {"codec": "top_k", "ratio": 0.05, "error_feedback": True},
                          "server.rounds": 6, "output.keep_checkpoints": 10})
    ref = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    for p in (again.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 3:
            p.unlink()
    (again.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, ref.params)
    assert resumed.metrics[-1]["bytes_up_total"] == ref.metrics[-1]["bytes_up_total"]


ASYNC = {"system.asynchronous": {"concurrency": 5, "buffer_size": 3},
         "system.compute_speed": {"kind": "lognormal", "mean": 100.0, "sigma": 1.0},
         "server.rounds": 8, "output.keep_checkpoints": 20}


def test_async_mode_is_reproducible_and_resumes_exactly(tmp_path):
    sc = tiny_scenario(**ASYNC)
    a = fedflat.run(sc, out=tmp_path / "a")
    b = fedflat.run(sc, out=tmp_path / "b")
    assert torch.equal(a.params, b.params)
    assert [m["clients"] for m in a.metrics] == [m["clients"] for m in b.metrics]
    times = [m["sim_seconds"] for m in a.metrics]
    assert times == sorted(times)
    assert times[0] > 0
    assert all(len(m["clients"]) == 3 for m in a.metrics)
    assert any(max(m["staleness"]) > 0 for m in a.metrics)
    for p in (b.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 4:
            p.unlink()
    (b.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(b.run_dir)
    assert torch.equal(resumed.params, a.params)


def test_async_fedbuff_step_is_sum_over_buffer(tmp_path):
    # With constant staleness weights the FedBuff step is (1/K) Σ Δ_i: equal to the plain mean.
    sc = tiny_scenario(**{**ASYNC, "server.rounds": 1,
                          "system.asynchronous": {"concurrency": 3, "buffer_size": 3,
                                                  "staleness": "constant"}})
    res = fedflat.run(sc, out=tmp_path / "a")
    assert res.metrics[0]["async/weight_sum"] == pytest.approx(3.0)


@pytest.mark.parametrize("weighting", ["uniform", "samples"])
def test_fedbuff_weights_each_update_by_its_staleness(weighting: str):
    # FedBuff, Algorithm 1 (Nguyen et al. 2022): Δ̄ += s(τ_i) Δ_i for each arrival, then
    # x += η_g Δ̄ / K. Default s(τ) = (1 + τ)^(-1/2); K = 2 updates of staleness 0 and 2:
    # the coefficients are s(0)/K = 1/2 and s(2)/K = 1/(2√3), whatever the weighting.
    from fedflat.runtime.build import build_pipeline
    from fedflat.scenario.loader import load_scenario
    from fedflat.server.pipeline import ServerRound

    sc = load_scenario(tiny_scenario(**{
        "system.asynchronous": {"concurrency": 3, "buffer_size": 2},
        "server.aggregation.weighting": weighting})).scenario
    pipe = build_pipeline(sc, 12)
    d = 3
    params = torch.zeros(d)
    deltas = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    # The runtime's weights in async mode: staleness_weights(sched, [0, 2]) (tests/test_system.py)
    weights = torch.tensor([1.0, 3.0 ** -0.5])
    rnd = ServerRound(round=0, params=params, deltas=deltas, weights=weights,
                      client_ids=[0, 1], num_clients=12)
    out, _, metrics = pipe.apply(rnd, pipe.init(params), torch.Generator().manual_seed(0))
    c = [1 / 2, 1 / (2 * math.sqrt(3))]  # ≈ [0.5, 0.289]
    expected = torch.tensor([c[0], c[1], 2 * (c[0] + c[1])])
    torch.testing.assert_close(out.new_params, expected, rtol=1e-6, atol=1e-7)
    assert metrics["async/weight_sum"] == pytest.approx(1 + 3**-0.5)


def test_fedbuff_uniform_equals_samples_weighting(tmp_path):
    # Both weightings are FedBuff's Σ s(τ_i) Δ_i / K under the mean rule (the async weights
    # replace n_i), so a run with stale updates ends at the same model up to rounding.
    runs = {w: fedflat.run(tiny_scenario(**{**ASYNC, "server.rounds": 4,
                                            "server.aggregation.weighting": w}),
                           out=tmp_path / w) for w in ("uniform", "samples")}
    assert any(max(m["staleness"]) > 0 for m in runs["uniform"].metrics)
    torch.testing.assert_close(runs["uniform"].params, runs["samples"].params,
                               rtol=1e-5, atol=1e-6)
