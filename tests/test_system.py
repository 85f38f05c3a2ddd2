"""System model (profiles, availability, clock, stragglers) and FedBuff scheduling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from fedflat.comm import asynchronous as A
from fedflat.comm import system as S
from fedflat.errors import ScenarioError
from fedflat.rng import numpy_rng
from fedflat.scenario.system import ConstantDist, LogNormalDist, SystemConfig

# Hand-computed timeline used below (all values exact in binary floating point):
# speed 10 samples/s; downlink 100 B/s + 0.5 s; uplink 50 B/s + 0.25 s;
# work [20, 30, 40] samples; 200 B down, 100 B up.
#   download = 0.5 + 200/100 = 2.5    compute = 2, 3, 4    upload = 0.25 + 100/50 = 2.25
#   finish   = 6.75, 7.75, 8.75         synchronous round = 8.75 s
BASE = {
    "compute_speed": 10.0,
    "downlink_bandwidth": 100.0,
    "uplink_bandwidth": 50.0,
    "downlink_latency": 0.5,
    "uplink_latency": 0.25,
}
WORK = [20, 30, 40]


def setup(n: int = 3, **overrides) -> tuple[SystemConfig, S.Profiles]:
    cfg = SystemConfig.model_validate({**BASE, **overrides})
    return cfg, S.client_profiles(n, cfg, numpy_rng(0, "system"))


def run(
    cfg, prof, *, rnd: int = 0, participants=(0, 1, 2), work=WORK, **kw
) -> S.RoundTiming:
    return S.simulate_round(
        list(participants), work, 200, 100, prof, cfg, numpy_rng(0, "system", rnd), **kw
    )


# ------------------------------------------------------------------------------- clock


def test_clock_matches_hand_timeline():
    cfg, prof = setup()
    t = run(cfg, prof)
    np.testing.assert_array_equal(t.download_s, [2.5, 2.5, 2.5])
    np.testing.assert_array_equal(t.compute_s, [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(t.upload_s, [2.25, 2.25, 2.25])
    np.testing.assert_array_equal(t.finish_s, [6.75, 7.75, 8.75])
    assert t.duration_s == 8.75
    assert t.completed.all()
    np.testing.assert_array_equal(t.steps_done, WORK)  # one step per sample by default
    np.testing.assert_array_equal(t.work_fraction, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(
        S.job_times(prof, [0, 1, 2], WORK, 200, 100), [6.75, 7.75, 8.75]
    )


def test_speed_trace_is_honoured(tmp_path: Path):
    (tmp_path / "speed.csv").write_text("client_id,speed\n2,5\n0,10\n1,20\n7,1\n")
    cfg = SystemConfig.model_validate(
        {**BASE, "compute_speed": {"kind": "trace", "path": "speed.csv"}}
    )
    prof = S.client_profiles(3, cfg, numpy_rng(0, "system"), base_dir=tmp_path)
    np.testing.assert_array_equal(
        prof.compute_speed, [10.0, 20.0, 5.0]
    )  # row 7 ignored
    t = run(cfg, prof)
    np.testing.assert_array_equal(t.compute_s, [2.0, 1.5, 8.0])
    assert t.duration_s == 2.5 + 8.0 + 2.25


def test_trace_missing_client_is_a_scenario_error(tmp_path: Path):
    (tmp_path / "bw.csv").write_text("0,100\n2,100\n")
    cfg = SystemConfig.model_validate(
        {"uplink_bandwidth": {"kind": "trace", "path": "bw.csv"}}
    )
    with pytest.raises(
        ScenarioError, match=r"system.uplink_bandwidth.path.*no value for 1"
    ):
        S.client_profiles(3, cfg, numpy_rng(0, "system"), base_dir=tmp_path)


def test_unlimited_defaults_take_no_time():
    cfg = SystemConfig()
    prof = S.client_profiles(4, cfg, numpy_rng(0, "system"))
    t = S.simulate_round(
        [3, 1], [100, 5], 1e6, 1e6, prof, cfg, numpy_rng(0, "system", 0)
    )
    assert t.duration_s == 0.0
    assert t.completed.all()


def test_lognormal_profile_mean_and_log_sigma():
    n, mean, sigma = 20000, 100.0, 0.5
    cfg = SystemConfig.model_validate(
        {"compute_speed": {"kind": "lognormal", "mean": mean, "sigma": sigma}}
    )
    speed = S.client_profiles(n, cfg, numpy_rng(3, "system")).compute_speed
    std = mean * math.sqrt(math.exp(sigma**2) - 1)  # closed form of the lognormal
    assert abs(speed.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(np.log(speed).std() - sigma) < 0.02
    # Drawn from the seed only: same seed, same profiles; another seed, others.
    again = S.client_profiles(n, cfg, numpy_rng(3, "system")).compute_speed
    other = S.client_profiles(n, cfg, numpy_rng(4, "system")).compute_speed
    assert np.array_equal(speed, again)
    assert not np.array_equal(speed, other)


# ------------------------------------------------------------------ deadline/stragglers


def test_deadline_drop_policy():
    cfg, prof = setup(deadline_s=8.0)
    t = run(cfg, prof)
    np.testing.assert_array_equal(t.completed, [True, True, False])
    np.testing.assert_array_equal(t.late, [False, False, True])
    np.testing.assert_array_equal(t.steps_done, [20, 30, 0])
    assert (
        t.duration_s == 8.0
    )  # the server waits for the late client until the deadline
    assert t.completed_ids.tolist() == [0, 1]


def test_deadline_partial_policy_keeps_whole_steps():
    cfg, prof = setup(deadline_s=8.0, straggler_policy="partial")
    # Steps of 10 samples = 1 s. Client 2: budget 8 - 2.5 - 2.25 = 3.25 s: 3 of 4 steps.
    t = run(cfg, prof, work_steps=[2, 3, 4])
    assert t.completed.all()
    np.testing.assert_array_equal(t.steps_done, [2, 3, 3])
    np.testing.assert_array_equal(t.work_fraction, [1.0, 1.0, 0.75])
    np.testing.assert_array_equal(t.finish_s, [6.75, 7.75, 7.75])
    assert t.duration_s == 7.75


def test_deadline_partial_policy_sample_steps():
    cfg, prof = setup(deadline_s=6.0, straggler_policy="partial")
    # One step per sample = 0.1 s; budget 6 - 4.75 = 1.25 s -> 12 steps each.
    t = run(cfg, prof)
    np.testing.assert_array_equal(t.steps_done, [12, 12, 12])
    np.testing.assert_allclose(t.work_fraction, [12 / 20, 12 / 30, 12 / 40])
    np.testing.assert_allclose(t.finish_s, [5.95] * 3)
    assert t.duration_s == pytest.approx(5.95)


def test_partial_policy_late_when_not_one_step_fits():
    cfg, prof = setup(deadline_s=5.0, straggler_policy="partial")
    t = run(cfg, prof, work_steps=[2, 3, 4])  # budget 0.25 s < one 1-s step
    assert t.late.all()
    assert not t.completed.any()
    assert t.duration_s == 5.0


def test_fedprox_stragglers_drop_and_partial():
    m, epochs, steps_per_epoch = 10, 5, 4
    ids = list(range(m))
    work = [40] * m  # 10 samples/s -> 4 s of compute each
    cfg, prof = setup(n=m, straggler_fraction=0.3)
    t = run(
        cfg,
        prof,
        participants=ids,
        work=work,
        work_steps=[epochs * steps_per_epoch] * m,
    )
    assert t.straggler.sum() == 3
    assert not t.completed[t.straggler].any()  # FedAvg discards them
    assert t.completed[~t.straggler].all()
    assert t.duration_s == 2.5 + 4.0 + 2.25  # no deadline: not waited for

    cfg, prof = setup(n=m, straggler_fraction=0.3, straggler_policy="partial")
    counts = np.zeros(epochs + 1)
    for rnd in range(400):
        t = run(
            cfg,
            prof,
            rnd=rnd,
            participants=ids,
            work=work,
            work_steps=[epochs * steps_per_epoch] * m,
            local_epochs=epochs,
        )
        assert t.completed.all()
        assert (t.steps_done[~t.straggler] == 20).all()
        e = t.steps_done[t.straggler] // steps_per_epoch
        assert (t.steps_done[t.straggler] % steps_per_epoch == 0).all()
        counts += np.bincount(e, minlength=epochs + 1)
    # Epochs uniform on {1, ..., E-1}: 1200 draws, each share 1/4 (5 standard errors).
    assert counts[0] == 0
    assert counts[epochs] == 0
    share = counts[1:epochs] / counts.sum()
    assert np.all(np.abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / counts.sum()))


def test_straggler_count_uses_python_round():
    cfg, prof = setup(n=10, straggler_fraction=0.25)
    t = run(cfg, prof, participants=range(10), work=[1] * 10)
    assert t.straggler.sum() == 2  # round(2.5) == 2, as in FedProx's `round(m * drop)`


def test_partial_stragglers_need_local_epochs():
    cfg, prof = setup(straggler_fraction=0.5, straggler_policy="partial")
    with pytest.raises(ValueError, match="local_epochs"):
        run(cfg, prof, local_epochs=1)


def test_dropout_rate_and_timing():
    m, p = 10, 0.3
    cfg, prof = setup(n=m, dropout=p)
    dropped = 0
    for rnd in range(500):
        t = run(cfg, prof, rnd=rnd, participants=range(m), work=[20] * m)
        dropped += int(t.dropped.sum())
        assert not (t.dropped & t.completed).any()
        assert np.all(t.drop_s[t.dropped] <= t.finish_s[t.dropped])
        assert np.isnan(t.drop_s[~t.dropped]).all()
        events = np.concatenate([t.finish_s[t.completed], t.drop_s[t.dropped]])
        assert t.duration_s == (events.max() if events.size else 0.0)
    rate = dropped / (500 * m)
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / (500 * m))


# ------------------------------------------------------------------------- availability


def test_availability_trace_is_honoured(tmp_path: Path):
    (tmp_path / "avail.csv").write_text(
        "client_id,round,available\n0,0,1\n1,0,0\n2,0,1\n1,1,1\n2,1,0\n"
    )
    for missing, default in (("available", True), ("unavailable", False)):
        cfg = SystemConfig.model_validate(
            {"availability": {"path": str(tmp_path / "avail.csv"), "missing": missing}}
        )
        prof = S.client_profiles(4, cfg, numpy_rng(0, "system"))
        mask = [
            S.available(prof, cfg, r, numpy_rng(0, "system", r)).tolist()
            for r in (0, 1, 5)
        ]
        assert mask[0] == [True, False, True, default]
        assert mask[1] == [default, True, False, default]
        assert mask[2] == [default] * 4


def test_availability_probability():
    n, p, rounds = 1000, 0.3, 20
    cfg = SystemConfig(availability=p)
    prof = S.client_profiles(n, cfg, numpy_rng(0, "system"))
    masks = np.stack(
        [S.available(prof, cfg, r, numpy_rng(0, "system", r)) for r in range(rounds)]
    )
    assert abs(masks.mean() - p) < 5 * math.sqrt(p * (1 - p) / (n * rounds))
    assert S.available(prof, SystemConfig(), 0, numpy_rng(0, "system", 0)).all()


# ------------------------------------------------------------------------------- config


def test_system_config_parsing():
    cfg = SystemConfig.model_validate(
        {
            "uplink_bandwidth": 1.25e6,
            "compute_speed": {"kind": "lognormal", "mean": 5, "sigma": 1},
        }
    )
    assert cfg.uplink_bandwidth == ConstantDist(value=1.25e6)
    assert isinstance(cfg.compute_speed, LogNormalDist)
    assert cfg.downlink_bandwidth is None


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"speed": 3}, "Extra inputs"),
        ({"compute_speed": 0}, "compute_speed.value must be > 0"),
        ({"compute_speed": {"kind": "gamma", "mean": 1}}, "kind"),
        ({"dropout": 1.0}, "less than 1"),
        ({"deadline_s": 0}, "greater than 0"),
        ({"straggler_policy": "wait"}, "straggler_policy"),
        (
            {"asynchronous": {"concurrency": 2, "buffer_size": 1}, "deadline_s": 5},
            "deadline_s",
        ),
        (
            {"asynchronous": {"concurrency": 2, "buffer_size": 1}, "availability": 0.5},
            "availability",
        ),
        ({"asynchronous": {"concurrency": 0, "buffer_size": 1}}, "concurrency"),
    ],
)
def test_system_config_rejects(block: dict, match: str):
    with pytest.raises(ValidationError, match=match):
        SystemConfig.model_validate(block)


# ------------------------------------------------------------------------------- async


def test_async_hand_timeline():
    # All three clients always in flight, so every replacement is the client that
    # just finished; job times 1, 2, 3 s; buffer K = 2. Ties at equal times go to the
    # job that started first.
    sched = A.async_scheduler(concurrency=3, buffer_size=2, staleness="constant")
    times = np.array([1.0, 2.0, 3.0])
    state = A.start(sched, 3, times, numpy_rng(0, "system", 0))
    got = []
    for _ in range(3):
        jobs, state = A.next_buffer(
            sched, state, times, numpy_rng(0, "system", state.version + 1)
        )
        got.append(
            (
                [
                    (j.client_id, j.start_version, j.start_s, j.end_s, j.staleness)
                    for j in jobs
                ],
                state.version,
                state.time_s,
            )
        )
    assert got == [
        ([(0, 0, 0.0, 1.0, 0), (1, 0, 0.0, 2.0, 0)], 1, 2.0),
        ([(0, 0, 1.0, 2.0, 1), (2, 0, 0.0, 3.0, 1)], 2, 3.0),
        ([(0, 1, 2.0, 3.0, 1), (1, 1, 2.0, 4.0, 1)], 3, 4.0),
    ]
    assert A.versions_in_use(state) == {2, 3}  # c2 started at v2 (t=3), c0 at v3 (t=4)


def _async_run(seed: int, buffers: int, state=None, sched=None, times=None):
    sched = sched or A.async_scheduler(concurrency=8, buffer_size=3, dropout=0.2)
    if times is None:
        times = np.random.default_rng(99).lognormal(0.0, 1.0, 40)
    if state is None:
        state = A.start(sched, 40, times, numpy_rng(seed, "system", 0))
    out = []
    for _ in range(buffers):
        jobs, state = A.next_buffer(
            sched, state, times, numpy_rng(seed, "system", state.version + 1)
        )
        out.append(jobs)
    return out, state


def test_async_reproducible_and_invariants():
    a, sa = _async_run(5, 30)
    b, sb = _async_run(5, 30)
    c, _ = _async_run(6, 30)
    assert a == b
    assert sa == sb
    assert a != c
    ends = [j.end_s for jobs in a for j in jobs]
    assert ends == sorted(ends)
    for v, jobs in enumerate(a):
        assert len(jobs) == 3
        assert all(j.staleness == v - j.start_version >= 0 for j in jobs)
    assert len(sa.in_flight) == 8
    assert len({e[2] for e in sa.in_flight}) == 8  # no client twice in flight
    assert sa.completed_total == 90
    assert sa.dropped_total > 0
    assert sa.next_seq == 8 + sa.completed_total + sa.dropped_total


def test_async_state_checkpoint_resume():
    full, s_full = _async_run(7, 6)
    first, s_mid = _async_run(7, 3)
    restored = A.AsyncState.from_dict(json.loads(json.dumps(s_mid.to_dict())))
    assert restored == s_mid
    rest, s_end = _async_run(7, 3, state=restored)
    assert first + rest == full
    assert s_end == s_full


def test_staleness_weights_as_defined():
    s = [0, 3, 8]
    poly = A.async_scheduler(concurrency=1, buffer_size=1, staleness_a=0.5)
    np.testing.assert_allclose(A.staleness_weights(poly, s), [1.0, 0.5, 1 / 3])
    hinge = A.async_scheduler(
        concurrency=1, buffer_size=1, staleness="hinge", staleness_a=10, staleness_b=4
    )
    np.testing.assert_allclose(
        A.staleness_weights(hinge, [0, 4, 5, 6]), [1, 1, 1 / 11, 1 / 21]
    )
    const = A.async_scheduler(concurrency=1, buffer_size=1, staleness="constant")
    np.testing.assert_array_equal(A.staleness_weights(const, s), [1.0, 1.0, 1.0])


def test_async_errors_and_config():
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        A.async_scheduler(concurrency=0, buffer_size=1)
    with pytest.raises(ValueError, match="dropout"):
        A.async_scheduler(concurrency=1, buffer_size=1, dropout=1.0)
    sched = A.async_scheduler(concurrency=5, buffer_size=1)
    with pytest.raises(ValueError, match="concurrency must be <= num_clients"):
        A.start(sched, 4, np.ones(4), numpy_rng(0, "system", 0))
    cfg = SystemConfig.model_validate(
        {
            "dropout": 0.1,
            "asynchronous": {"concurrency": 4, "buffer_size": 2, "staleness": "hinge"},
        }
    )
    sched = A.scheduler_from_config(cfg)
    assert (sched.concurrency, sched.buffer_size, sched.staleness, sched.dropout) == (
        4,
        2,
        "hinge",
        0.1,
    )
    with pytest.raises(ValueError, match="asynchronous"):
        A.scheduler_from_config(SystemConfig())
