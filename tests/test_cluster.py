"""The Ray backend as a cluster sees it: resource feasibility, RAY_ADDRESS, lost actors,
several nodes, GPUs.

Facts checked: a request the cluster cannot hold is refused at start with one line naming
the resources (hand-counted room per node); a client actor killed with SIGKILL is replaced
and its chunk retried, so the final model equals the uninterrupted serial run bit for bit
(the chunk's random streams are functions of (seed, round, client)); with ``drop`` the round
completes without that chunk's clients; a killed server actor fails the run with a clear
error and ``fedflat resume`` then reaches the uninterrupted model; on a two-node
``ray.cluster_utils.Cluster`` the actors land on both nodes and the model equals serial.
Multi-node clusters run in a subprocess: the suite shares one Ray instance (conftest).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, tiny_scenario

import fedflat
from fedflat.errors import ScenarioError
from fedflat.scenario.schema import RuntimeConfig

ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
ENV.pop("RAY_ADDRESS", None)


# ---------------------------------------------------------------------------- feasibility
def _nodes(*cpus_gpus: tuple[float, float]) -> list[dict[str, float]]:
    return [{"CPU": c, "GPU": g, "memory": 1e9} for c, g in cpus_gpus]


def test_check_resources_counts_room_node_by_node():
    from fedflat.runtime.backends import check_resources

    two_by_one = _nodes((1, 0), (1, 0))
    assert check_resources(RuntimeConfig(num_actors=2), two_by_one) is None
    key, msg = check_resources(RuntimeConfig(num_actors=3), two_by_one)
    assert key == "runtime.num_actors"
    assert "need 3 CPUs" in msg
    assert "offers 2 CPUs and 0 GPUs on 2 nodes" in msg
    assert "room for 2 such actors" in msg
    # 3 CPUs in total, but a 2-CPU actor fits on neither 1.5-CPU node.
    key, msg = check_resources(RuntimeConfig(num_actors=1, num_cpus=2), _nodes((1.5, 0),
                                                                                (1.5, 0)))
    assert key == "runtime.num_actors"
    assert "room for 0 such actors" in msg
    # Four quarter-GPU actors share one GPU exactly; a fifth does not fit.
    gpu = _nodes((8, 1))
    assert check_resources(RuntimeConfig(num_actors=4, num_gpus=0.25), gpu) is None
    key, msg = check_resources(RuntimeConfig(num_actors=5, num_gpus=0.25), gpu)
    assert key == "runtime.num_gpus"
    assert "need 5 CPUs and 1.25 GPUs" in msg
    key, _ = check_resources(RuntimeConfig(num_actors=1, num_gpus=1), _nodes((4, 0)))
    assert key == "runtime.num_gpus"
    # strict_spread: one actor per node.
    roomy = _nodes((4, 0), (4, 0))
    assert check_resources(RuntimeConfig(num_actors=3, placement="spread"), roomy) is None
    key, msg = check_resources(RuntimeConfig(num_actors=3, placement="strict_spread"), roomy)
    assert "distinct nodes" in msg
    assert "room for 2" in msg


def test_ray_address_from_the_environment_is_used_or_refused(monkeypatch):
    from fedflat.runtime.backends import cluster_address

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(RuntimeConfig()) == "10.0.0.1:6379"
    assert cluster_address(RuntimeConfig(address="10.0.0.1:6379")) == "10.0.0.1:6379"
    assert cluster_address(RuntimeConfig(address="auto")) == "auto"
    with pytest.raises(ScenarioError, match=re.escape("RAY_ADDRESS='10.0.0.1:6379'")) as err:
        cluster_address(RuntimeConfig(address="10.0.0.2:6379"))
    assert err.value.key == "runtime.address"
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster_address(RuntimeConfig()) is None


def _write(path: Path, sc: dict) -> Path:
    path.write_text(yaml.safe_dump(sc, sort_keys=False))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_num_gpus_without_cuda_is_refused_by_validate_and_run(tmp_path, capsys):
    from fedflat.cli import main

    sc = tiny_scenario(**{"runtime.backend": "ray", "runtime.num_gpus": 0.5})
    path = _write(tmp_path / "gpu.yaml", sc)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1)
                if t.strip().startswith("num_gpus:"))
    expected = f"error: {path}:{line}: runtime.num_gpus:"
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(expected)
    # `fedflat run` as a user starts it: one line, exit 2, no run folder.
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "run", str(path), "--out",
                           str(tmp_path / "run")], env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert err[0].startswith(expected)
    assert "no CUDA device" in err[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- lost actors
def _start_in_thread(tmp_path: Path, sc: dict) -> tuple[Any, list[Any], dict[str, Any],
                                                        threading.Thread]:
    """Start a Ray run in a thread (on the shared Ray); returns its runner, the backend
    once built, the outcome and the thread."""
    from fedflat.runtime.backends import RayBackend
    from fedflat.runtime.driver import Runner, load_data, new_run_dir
    from fedflat.scenario import load_scenario

    loaded = load_scenario(sc)
    runner = Runner(loaded, new_run_dir(loaded.scenario, tmp_path / "run"), load_data(loaded))
    runner.write_static_files()
    runner.write_summary("running")
    made: list[Any] = []
    outcome: dict[str, Any] = {}

    def build(s, f, p):
        made.append(RayBackend(s, f, p))
        return made[-1]

    def target() -> None:
        try:
            outcome["result"] = runner.execute(make_backend=build)
        except BaseException as exc:
            outcome["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return runner, made, outcome, th


def _poll(cond, what: str, timeout: float = 90.0) -> None:
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _rounds_done(runner: Any) -> int:
    path = runner.run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


LOST = {"server.rounds": 6, "data.synthetic.max_size": 300, "client.local_epochs": 3,
        "eval.every": 3}


def _kill_client_actor(tmp_path: Path, policy: str) -> tuple[dict, Any, int]:
    sc = tiny_scenario(**LOST, **{"runtime.backend": "ray", "runtime.num_actors": 2,
                                  "runtime.on_actor_failure": policy})
    runner, made, outcome, th = _start_in_thread(tmp_path, sc)
    _poll(lambda: (made and _rounds_done(runner) >= 1) or outcome, "round 0")
    assert "error" not in outcome, outcome.get("error")
    killed = made[0].placement[0]["pid"]
    os.kill(killed, signal.SIGKILL)
    th.join(timeout=120)
    assert not th.is_alive(), "the run hangs after a lost client actor"
    assert "error" not in outcome, outcome.get("error")
    return sc, outcome["result"], killed


@pytest.mark.ray
@pytest.mark.slow
def test_killed_client_actor_is_replaced_and_its_chunk_retried(tmp_path, ray_session):
    sc, res, killed = _kill_client_actor(tmp_path, "retry")
    serial = fedflat.run({**sc, "runtime": {"threads": 1}}, out=tmp_path / "serial")
    assert torch.equal(res.params, serial.params)
    assert [m["clients"] for m in res.metrics] == [m["clients"] for m in serial.metrics]
    lines = [json.loads(t) for t in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("actor_failures", 0) for m in lines) == 1
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["actor_failures"] == 1
    assert summary["ray_actors"][0]["replaced"] == 1
    assert summary["ray_actors"][0]["pid"] != killed


@pytest.mark.ray
@pytest.mark.slow
def test_killed_client_actor_with_drop_completes_the_round_without_its_clients(
        tmp_path, ray_session):
    sc, res, _ = _kill_client_actor(tmp_path, "drop")
    hit = [m for m in res.metrics if m.get("actor_failures")]
    assert len(hit) == 1
    rec = hit[0]
    assert rec["actor_dropped"]
    assert len(rec["clients"]) + len(rec["actor_dropped"]) == sc["server"]["clients_per_round"]
    assert not set(rec["clients"]) & set(rec["actor_dropped"])
    assert len(res.metrics) == sc["server"]["rounds"]  # every round completed
    later = [m for m in res.metrics if m["round"] > rec["round"]]
    assert all(len(m["clients"]) == sc["server"]["clients_per_round"] for m in later)
    assert res.summary["status"] == "completed"


@pytest.mark.ray
@pytest.mark.slow
def test_killed_server_actor_fails_the_run_and_resume_reaches_the_same_model(
        tmp_path, ray_session):
    from fedflat.runtime.backends import ClusterError

    sc = tiny_scenario(**LOST, **{"runtime.backend": "ray", "runtime.num_actors": 2})
    runner, made, outcome, th = _start_in_thread(tmp_path, sc)
    _poll(lambda: (made and _rounds_done(runner) >= 2) or outcome, "round 1")
    assert "error" not in outcome, outcome.get("error")
    os.kill(made[0].server_placement["pid"], signal.SIGKILL)
    th.join(timeout=120)
    assert not th.is_alive(), "the run hangs after a lost server actor"
    err = outcome.get("error")
    assert isinstance(err, ClusterError), repr(err)
    assert "server actor died" in str(err)
    assert "fedflat resume" in str(err)
    summary = json.loads((runner.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "server actor died" in summary["error"]
    assert summary["rounds_completed"] < sc["server"]["rounds"]
    resumed = fedflat.resume(runner.run_dir)
    serial = fedflat.run({**sc, "runtime": {"threads": 1}}, out=tmp_path / "serial")
    assert resumed.summary["status"] == "completed"
    assert torch.equal(resumed.params, serial.params)


# ---------------------------------------------------------------------------- two nodes
CLUSTER_SCRIPT = r"""
import contextlib, io, json, os, sys, time
import numpy as np
import ray
from ray.cluster_utils import Cluster

import fedflat
from fedflat.cli import main
from fedflat.runtime.backends import INLINE_RUNTIME_ENV

scenario, work = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                         "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
out = {}
try:
    os.environ["RAY_ADDRESS"] = cluster.address  # honoured: no runtime.address given

    def cli(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(list(args))
        lines = [t for t in err.getvalue().splitlines() if t.startswith("error")]
        return {"rc": rc, "errors": lines}

    out["too_many"] = cli("run", scenario, "--out", work + "/too_many",
                          "--set", "runtime.num_actors=3")
    out["conflict"] = cli("run", scenario, "--out", work + "/conflict",
                          "--set", "runtime.address=127.0.0.9:1")
    res = fedflat.run(scenario, out=work + "/ray", overrides={"runtime.placement": "spread"})
    out["ray_params"] = res.params.tolist()
    out["summary"] = res.summary

    # The inline limit reaches processes of a cluster fedflat did not start: a 1 MB result
    # stays out of the object store (no location) with it, and goes into it without.
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    out["nodes"] = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])

    @ray.remote(num_cpus=0)
    class Probe:
        def big(self):
            return np.zeros(1_000_000 // 8)

    refs = {name: Probe.options(runtime_env=env).remote().big.remote()
            for name, env in (("with", INLINE_RUNTIME_ENV), ("without", None))}
    ray.get(list(refs.values()))

    def where(ref):
        return ray.experimental.get_object_locations([ref])[ref]["node_ids"]

    # Locations are reported to the owner asynchronously: wait for the control (stored)
    # object's location before reading the inlined one's, so a slow report is not misread.
    for _ in range(200):
        if where(refs["without"]):
            break
        time.sleep(0.1)
    out["inline_locations"] = {name: where(ref) for name, ref in refs.items()}
    ray.shutdown()
finally:
    cluster.shutdown()
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """One two-node cluster (head + worker, one CPU each) in a subprocess: the refusals,
    a spread run and the inline probe; returns what it saw and the serial run."""
    tmp = tmp_path_factory.mktemp("cluster")
    sc = tiny_scenario(**{"server.rounds": 3, "runtime.backend": "ray",
                          "runtime.num_actors": 2})
    path = _write(tmp / "two.yaml", sc)
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, str(path), str(tmp)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    found = [t for t in proc.stdout.splitlines() if t.startswith("RESULT ")]
    assert found, proc.stdout[-3000:] + proc.stderr[-3000:]
    serial = fedflat.run({**sc, "runtime": {"threads": 1}}, out=tmp / "serial")
    return json.loads(found[0][len("RESULT "):]), serial, tmp, path


@pytest.mark.slow
def test_cluster_too_small_or_conflicting_address_is_refused_in_one_line(two_nodes):
    seen, _, tmp, path = two_nodes
    too_many = seen["too_many"]
    assert too_many["rc"] == 2
    assert len(too_many["errors"]) == 1
    line = too_many["errors"][0]
    assert line.startswith("error: --set runtime.num_actors: runtime.num_actors: 3 client "
                           "actors of 1 CPU")
    assert "offers 2 CPUs and 0 GPUs on 2 nodes" in line
    summary = json.loads((tmp / "too_many" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "offers 2 CPUs" in summary["error"]
    assert not (tmp / "too_many" / "final_model.pt").exists()
    conflict = seen["conflict"]
    assert conflict["rc"] == 2
    assert len(conflict["errors"]) == 1
    assert conflict["errors"][0].startswith("error: --set runtime.address: runtime.address")
    assert "RAY_ADDRESS" in conflict["errors"][0]
    assert path.exists()


@pytest.mark.slow
def test_two_node_cluster_spreads_actors_and_equals_serial(two_nodes):
    seen, serial, _, _ = two_nodes
    assert torch.equal(torch.tensor(seen["ray_params"]), serial.params)
    nodes = {a["node_id"] for a in seen["summary"]["ray_actors"]}
    assert nodes == set(seen["nodes"])
    assert len(nodes) == 2
    assert seen["inline_locations"]["with"] == []
    assert seen["inline_locations"]["without"]  # stored: on a node (or two, once fetched)


# ---------------------------------------------------------------------------- GPUs
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
def test_batch_indices_draw_on_a_cuda_generator():
    from fedflat.client.update import LocalSchedule, batch_indices
    from fedflat.rng import stream

    gen = stream(0, "client", 0, 0, device="cuda")
    shuffle = list(batch_indices(23, LocalSchedule(batch_size=5, epochs=2), gen))
    assert all(b.device.type == "cuda" for b in shuffle)
    # each epoch is a permutation of the 23 examples (5 batches: 5+5+5+5+3)
    for epoch in (shuffle[:5], shuffle[5:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(23))
    poisson = list(batch_indices(23, LocalSchedule(batch_size=5, epochs=1, batching="poisson"),
                                 gen))
    assert len(poisson) == round(23 / 5)
    assert all(b.device.type == "cuda" for b in poisson)


@CUDA
@pytest.mark.ray
@pytest.mark.slow
def test_actors_sharing_a_gpu_train_alike_one_by_one_and_vectorised(tmp_path, ray_session):
    """Two actors on half a GPU each; the chunk loop and the vmap engine draw the same
    CUDA streams, so they agree within float tolerance."""
    if ray_session.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the shared Ray session has no GPU")
    runs = {}
    for vec in (False, True):
        sc = tiny_scenario(**{"server.rounds": 3, "runtime.backend": "ray",
                              "runtime.num_actors": 2, "runtime.num_gpus": 0.5,
                              "runtime.vectorize": vec})
        runs[vec] = fedflat.run(sc, out=tmp_path / f"v{vec}")
    assert (runs[False].params - runs[True].params).abs().max() <= 1e-4
