"""Invariants of the runtime: serial == Ray (1, 2, 4 actors), resumed == uninterrupted,
Ctrl-C leaves a valid checkpoint, the run folder holds what it promises."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_scenario

import fedflat
from fedflat.runtime.checkpoint import load_latest


def test_serial_run_folder(tmp_path):
    res = fedflat.run(tiny_scenario(), out=tmp_path / "run")
    d = res.run_dir
    assert d == tmp_path / "run"
    for name in ("scenario.yaml", "metrics.jsonl", "summary.json", "clients.json",
                 "final_model.pt"):
        assert (d / name).is_file(), name
    initial, *lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    # the first line evaluates the initial model, before round 0 trains
    assert initial["round"] == -1
    assert "clients" not in initial
    assert {"test_accuracy", "test_loss"} <= set(initial)
    assert initial == res.initial
    assert [m["round"] for m in lines] == [0, 1, 2, 3]
    for m in lines:
        assert {"round", "client_train_loss", "clients", "wall_seconds"} <= set(m)
        assert len(m["clients"]) == 4
        assert len(set(m["clients"])) == 4
    assert "test_accuracy" in lines[1]
    assert "test_loss" in lines[3]
    assert "test_accuracy" not in lines[0]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds_completed"] == 4
    clients = json.loads((d / "clients.json").read_text())
    sizes = [c["num_samples"] for c in clients["clients"]]
    assert len(sizes) == 12
    assert sum(sum(c["class_counts"]) for c in clients["clients"]) == sum(sizes)
    assert torch.equal(torch.load(d / "final_model.pt"), res.params)
    assert res.params.ndim == 1


def test_overrides_match_set_syntax(tmp_path):
    a = fedflat.run(tiny_scenario(), overrides={"server.rounds": 2}, out=tmp_path / "a")
    b = fedflat.run(tiny_scenario(), overrides=["server.rounds=2"], out=tmp_path / "b")
    assert len(a.metrics) == 2
    assert torch.equal(a.params, b.params)


def test_same_seed_same_model_other_seed_other_model(tmp_path):
    a = fedflat.run(tiny_scenario(), out=tmp_path / "a")
    b = fedflat.run(tiny_scenario(), out=tmp_path / "b")
    c = fedflat.run(tiny_scenario(seed=4), out=tmp_path / "c")
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.params, c.params)


def test_learning_happens(tmp_path):
    res = fedflat.run(tiny_scenario(**{"server.rounds": 12, "eval.every": 1}), out=tmp_path / "r")
    first, last = res.metrics[0]["test_loss"], res.metrics[-1]["test_loss"]
    assert last < first


def test_poisson_sampling_can_be_empty_and_is_not_resampled(tmp_path):
    sc = tiny_scenario(**{"server.sampling": "poisson", "server.sampling_rate": 0.05,
                          "server.rounds": 12})
    res = fedflat.run(sc, out=tmp_path / "p")
    sizes = [len(m["clients"]) for m in res.metrics]
    assert 0 in sizes  # with q = 0.05 and 12 clients, P(empty) = 0.54 per round
    assert len(set(sizes)) > 1


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("actors", [1, 2, 4])
def test_ray_equals_serial(tmp_path, ray_session, actors):
    sc = tiny_scenario(**{"server.rounds": 3, "server.optimizer": "fedavgm",
                          "client.momentum": 0.5})
    serial = fedflat.run(sc, out=tmp_path / "serial")
    ray_sc = tiny_scenario(**{"server.rounds": 3, "server.optimizer": "fedavgm",
                              "client.momentum": 0.5, "runtime.backend": "ray",
                              "runtime.num_actors": actors})
    on_ray = fedflat.run(ray_sc, out=tmp_path / f"ray{actors}")
    assert torch.equal(serial.params, on_ray.params)
    for a, b in zip(serial.metrics, on_ray.metrics, strict=True):
        assert a["clients"] == b["clients"]
        assert a["client_train_loss"] == b["client_train_loss"]
    assert ray_session.is_initialized(), "the run must not shut down a Ray it did not start"


WIRE_CASES = {
    # model versions travel in the payload; staleness weights in the jobs
    "async": {"system.asynchronous": {"concurrency": 5, "buffer_size": 3},
              "system.compute_speed": {"kind": "lognormal", "mean": 100.0, "sigma": 1.0}},
    # per-client state (error-feedback residuals) goes out and comes back every round
    "error_feedback": {"comm.uplink": {"codec": "top_k", "ratio": 0.05, "error_feedback": True}},
}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WIRE_CASES))
def test_ray_equals_serial_for_what_travels_with_a_round(tmp_path, ray_session, case):
    sc = tiny_scenario(**{"server.rounds": 5, **WIRE_CASES[case]})
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}},
                         out=tmp_path / "r")
    assert torch.equal(serial.params, on_ray.params)
    assert [m["clients"] for m in serial.metrics] == [m["clients"] for m in on_ray.metrics]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_stored_payload_equals_serial(tmp_path, ray_session):
    """A payload above the inline limit goes into the object store once per round (forced
    here with a limit of 0 bytes): same model as serial."""
    from fedflat.runtime.backends import RayBackend
    from fedflat.runtime.driver import Runner, load_data, new_run_dir
    from fedflat.scenario import load_scenario

    sc = tiny_scenario(**{"server.rounds": 3})
    serial = fedflat.run(sc, out=tmp_path / "s")
    loaded = load_scenario({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}})
    runner = Runner(loaded, new_run_dir(loaded.scenario, tmp_path / "r"), load_data(loaded))
    runner.write_static_files()
    stored = runner.execute(make_backend=lambda s, f, p: RayBackend(s, f, p, inline_bytes=0))
    assert torch.equal(serial.params, stored.params)


# ---------------------------------------------------------------------------- kill and resume
SLOW = {"server.rounds": 30, "client.local_epochs": 6, "data.synthetic.max_size": 400,
        "eval.every": 5}


def _write(tmp_path: Path, sc: dict) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(sc))
    return path


def _start(path: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedflat.cli", "run", str(path), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _wait_rounds(out: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        mf = out / "metrics.jsonl"
        if mf.exists() and len(mf.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.005)
    pytest.fail("run too slow")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    sc = tiny_scenario(**SLOW)
    reference = fedflat.run(sc, out=tmp_path / "ref")
    out = tmp_path / "killed"
    proc = _start(_write(tmp_path, sc), out)
    _wait_rounds(out, proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running", "a killed run must not look complete"
    ckpt = load_latest(out)
    assert ckpt is not None
    assert 0 < ckpt["next_round"] < 30
    resumed = fedflat.resume(out)
    assert torch.equal(resumed.params, reference.params)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [-1, *range(30)]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_ctrl_c_leaves_checkpoint_and_interrupted_summary(tmp_path):
    sc = tiny_scenario(**{**SLOW, "output.checkpoint_every": 100})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    out = tmp_path / "int"
    proc = _start(_write(tmp_path, sc), out)
    _wait_rounds(out, proc, 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    ckpt = load_latest(out)
    assert ckpt is not None
    assert ckpt["next_round"] == summary["rounds_completed"]
    # one line per round, after the initial model's line
    assert ckpt["next_round"] == len((out / "metrics.jsonl").read_text().splitlines()) - 1
    resumed = fedflat.resume(out)
    assert torch.equal(resumed.params, reference.params)


# ---------------------------------------------------------------------------- per-client state
def _rewind(run_dir: Path, to_round: int) -> None:
    """Make a finished run folder look as if it had been killed after ``to_round`` rounds."""
    for p in (run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > to_round:
            p.unlink()
    (run_dir / "final_model.pt").unlink()


@pytest.mark.parametrize("method", ["scaffold", "fedsmoo", "fedlesam", "fedsam_swa"])
def test_stateful_methods_resume_exactly(tmp_path, method):
    sc = tiny_scenario(method=method, **{"server.rounds": 6, "output.keep_checkpoints": 10,
                                         "server.swa.start": 2, "server.swa.cycle": 2}
                       if method == "fedsam_swa" else {"server.rounds": 6,
                                                       "output.keep_checkpoints": 10})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    _rewind(again.run_dir, 3)
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    assert [m.get("test_accuracy") for m in resumed.metrics] == \
        [m.get("test_accuracy") for m in reference.metrics]


@pytest.mark.ray
@pytest.mark.slow
def test_scaffold_state_on_ray_equals_serial(tmp_path, ray_session):
    sc = tiny_scenario(method="scaffold", **{"server.rounds": 5, "data.num_clients": 6})
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}},
                         out=tmp_path / "r")
    assert torch.equal(serial.params, on_ray.params)


def test_wire_round_trip_is_exact_and_writable():
    """What the Ray backend ships between processes comes back equal, with dtypes kept
    (bfloat16, which numpy lacks, included) and writable (clients update in place)."""
    import pickle

    from fedflat.client.update import ClientResult
    from fedflat.runtime.backends import pack_payload, pack_results, unpack_payload, unpack_results
    from fedflat.runtime.worker import RoundPayload

    g = torch.Generator().manual_seed(0)
    payload = RoundPayload(round=3, params=torch.randn(7, generator=g),
                           broadcast={"c": torch.randn(7, generator=g, dtype=torch.float64)},
                           versions={1: torch.randn(7, generator=g).bfloat16()})
    back = unpack_payload(pickle.loads(pickle.dumps(pack_payload(payload))))
    assert back.round == 3
    assert torch.equal(back.params, payload.params)
    assert back.broadcast["c"].dtype == torch.float64
    assert torch.equal(back.broadcast["c"], payload.broadcast["c"])
    assert back.versions[1].dtype == torch.bfloat16
    assert torch.equal(back.versions[1],
                                                                     payload.versions[1])
    back.params.add_(1.0)  # writable
    results = [ClientResult(client_id=c, delta=torch.randn(7, generator=g), num_samples=10 + c,
                            train_loss=0.5 * c, steps=c, client_state={"ef": torch.ones(7) * c},
                            extras={"n": torch.tensor([c])}, metrics={"m": float(c)})
               for c in (4, 9)]
    again = unpack_results(pickle.loads(pickle.dumps(pack_results(results))))
    for a, b in zip(results, again, strict=True):
        assert (a.client_id, a.num_samples, a.train_loss, a.steps, a.metrics) == \
            (b.client_id, b.num_samples, b.train_loss, b.steps, b.metrics)
        assert torch.equal(a.delta, b.delta)
        assert torch.equal(a.extras["n"], b.extras["n"])
        assert torch.equal(a.client_state["ef"], b.client_state["ef"])
    assert unpack_results(pack_results([])) == []
