"""fedflat on Flower: the message format, the ServerApp loop (over an in-process grid that runs
the real ClientApp), Flower's simulation engine against the serial backend, the app folder
Flower's own tools accept, and (slow) a TLS loopback deployment."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tomllib
import torch
import yaml

pytest.importorskip("flwr")

from conftest import REPO, tiny_scenario
from flwr.app import Context, Error, Message, RecordDict

import fedflat
from fedflat.client.update import ClientResult
from fedflat.errors import ScenarioError
from fedflat.flower import messages
from fedflat.flower.app import write_app
from fedflat.flower.client_app import ClientSettings, make_client_app
from fedflat.flower.server_app import (
    FlowerRunError,
    ServerSettings,
    run_server,
    settings_from_run_config,
)
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.runtime.checkpoint import load_latest
from fedflat.runtime.worker import EF_KEY, ClientJob, ClientWorker, RoundPayload
from fedflat.scenario.loader import dump_scenario, load_scenario

TIMING_KEYS = {"round_seconds", "wall_seconds"}


class LocalGrid:
    """A Grid whose nodes run a ClientApp in this process (one Context per node).

    Every message is answered when pushed; an exception in the ClientApp becomes an error
    reply, as Flower's runtimes do. ``fail(msg, ctx)`` may return a reason to fail a node.
    """

    def __init__(self, node_configs, fail=None, threads=1):
        from flwr.supercore.task_identity import TaskIdentity

        # what Flower's runtimes set before a ServerApp creates messages
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app = make_client_app(ClientSettings(threads=threads))
        self.nodes = {
            7000 + i: Context(run_id=1, node_id=7000 + i, node_config=dict(cfg),
                              state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.fail = fail
        self.replies = {}
        self.sent = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = str(uuid.uuid4())
            m.metadata.__dict__["_message_id"] = mid
            ctx = self.nodes[m.metadata.dst_node_id]
            self.sent.append(m)
            reason = self.fail(m, ctx) if self.fail else None
            try:
                if reason:
                    raise RuntimeError(reason)
                reply = self.app(m, ctx)
            except Exception as exc:  # what a ClientApp runtime turns into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def nodes_for(n):
    return [{"partition-id": k, "num-partitions": n} for k in range(n)]


def flower_run(sc, out, grid, **kw):
    loaded = load_scenario(sc)
    text = dump_scenario(loaded.scenario)
    settings = ServerSettings(scenario_yaml=text, out=out,
                              node_timeout_s=kw.pop("node_timeout_s", 5.0),
                              poll_s=0.0, **kw)
    return run_server(grid, settings)


def same_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        ka, kb = set(ra) - TIMING_KEYS, set(rb) - TIMING_KEYS
        assert ka == kb
        for k in ka:
            va, vb = ra[k], rb[k]
            if isinstance(va, float) and math.isnan(va):
                assert math.isnan(vb), k
            else:
                assert va == vb, k


# ----------------------------------------------------------------------------- messages
def test_messages_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(0)
    payload = RoundPayload(round=5, params=torch.randn(257, generator=g),
                           broadcast={"c": torch.randn(257, generator=g)})
    state = {"c_i": torch.randn(257, generator=g), "count": torch.arange(3)}
    for job in (ClientJob(5, 11, 0.125), ClientJob(5, 11, 0.125, max_steps=7)):
        content = messages.encode_instruction(payload, job, state, "seed: 1\n")
        back = messages.decode_instruction(content)
        assert back.job == job
        assert back.payload.versions == {}
        assert torch.equal(back.payload.params, payload.params)
        assert back.payload.params.dtype == torch.float32
        assert torch.equal(back.payload.broadcast["c"], payload.broadcast["c"])
        assert set(back.state) == set(state)
        assert all(torch.equal(back.state[k], v) and back.state[k].dtype == v.dtype
                   for k, v in state.items())
        assert back.scenario_yaml == "seed: 1\n"
    # asynchronous mode: the job's own (stale) model version travels, with its weight
    stale = torch.randn(257, generator=g)
    apayload = RoundPayload(round=9, params=payload.params, broadcast={}, versions={3: stale})
    ajob = ClientJob(round=14, client_id=2, lr=0.1, version=3, weight=0.25)
    back = messages.decode_instruction(messages.encode_instruction(apayload, ajob, {}, "seed: 1\n"))
    assert back.job == ajob
    assert back.payload.round == 9
    assert torch.equal(back.payload.versions[3], stale)
    assert torch.equal(back.payload.params, stale)
    res = ClientResult(client_id=11, delta=torch.randn(257, generator=g), num_samples=40,
                       train_loss=float("nan"), steps=4, client_state={},
                       extras={"h": torch.ones(257)}, metrics={"bytes_up": 1032.0})
    out = messages.decode_result(messages.encode_result(res))
    assert torch.equal(out.delta, res.delta)
    assert math.isnan(out.train_loss)
    assert (out.client_id, out.num_samples, out.steps) == (11, 40, 4)
    assert out.client_state == {}
    assert torch.equal(out.extras["h"], res.extras["h"])
    assert out.metrics == {"bytes_up": 1032.0}


def test_messages_refuse_what_they_cannot_carry():
    with pytest.raises(messages.MessageError, match="bfloat16"):
        messages.tensors_to_record({"w": torch.zeros(3, dtype=torch.bfloat16)})
    payload = RoundPayload(round=1, params=torch.zeros(3), broadcast={})
    with pytest.raises(messages.MessageError, match="version 4"):
        messages.encode_instruction(payload, ClientJob(1, 0, 0.1, version=4), {}, "a: 1\n")
    content = messages.encode_instruction(payload, ClientJob(1, 0, 0.1), {}, "a: 1\n")
    content.config_records[messages.SCENARIO]["yaml"] = "a: 2\n"  # tampered text
    with pytest.raises(messages.MessageError, match="SHA-256"):
        messages.decode_instruction(content)
    content = messages.encode_instruction(payload, ClientJob(1, 0, 0.1), {}, "a: 1\n")
    content.config_records[messages.JOB]["wire_version"] = 99
    with pytest.raises(messages.MessageError, match="wire version"):
        messages.decode_instruction(content)
    with pytest.raises(messages.MessageError, match="lacks records"):
        messages.decode_result(RecordDict())


# ----------------------------------------------------------------------------- server loop
@pytest.mark.parametrize("extra", [
    {},
    # per-client state both ways: SCAFFOLD control variates (state + broadcast) and top-k
    # error-feedback residuals (client state), plus FedAvgM server state
    {"method": "scaffold", "comm.uplink": {"codec": "top_k", "ratio": 0.2, "error_feedback": True},
     "server.optimizer": "fedavgm", "server.momentum": 0.5},
    # buffered asynchronous rounds: clients train from stale model versions
    {"system.asynchronous": {"concurrency": 5, "buffer_size": 3},
     "system.compute_speed": {"kind": "lognormal", "mean": 100.0, "sigma": 1.0}},
    # sample-level DP: the nodes get the scenario with the noise the Runner calibrated
    {"privacy.sample_level": {"enabled": True, "epsilon": 3.0, "delta": 1e-5, "clip_norm": 1.0}},
], ids=["fedavg", "scaffold_ef", "async", "dp_sgd"])
def test_server_app_equals_serial(tmp_path, extra):
    sc = tiny_scenario(**{"runtime.threads": 1, **extra})
    serial = fedflat.run(sc, out=tmp_path / "serial")
    grid = LocalGrid(nodes_for(12))
    res = flower_run(sc, tmp_path / "flower", grid)
    assert torch.equal(res.params, serial.params)
    same_records(res.metrics, serial.metrics)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["backend"] == "flower"
    assert torch.equal(torch.load(tmp_path / "flower" / "final_model.pt"), serial.params)
    lines = (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [-1, 0, 1, 2, 3]
    # each sampled client was sent to the node holding its partition, once per round
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(trains) == sum(len(r["clients"]) for r in serial.metrics)
    for m in trains:
        cid = int(m.content.config_records[messages.JOB]["client_id"])
        assert grid.nodes[m.metadata.dst_node_id].node_config["partition-id"] == cid
    if "method" in extra:
        states = load_latest(tmp_path / "flower")["server"]["client_states"]
        assert states
        assert all(EF_KEY in s and len(s) > 1 for s in states.values())
        # a client sampled twice received the state its previous reply carried
        seen = {}
        for m in trains:
            cid = int(m.content.config_records[messages.JOB]["client_id"])
            st = messages.record_to_tensors(m.content.array_records[messages.STATE])
            assert bool(st) == (cid in seen)
            seen[cid] = True


def test_failed_reply_aborts_with_the_client_named(tmp_path):
    def fail(msg, ctx):
        if msg.metadata.message_type == "train" and ctx.node_config["partition-id"] == 5:
            return "disk full on client 5"
        return None

    sc = tiny_scenario(**{"runtime.threads": 1, "server.clients_per_round": 12})
    with pytest.raises(FlowerRunError, match=r"round 0, client 5 .*disk full"):
        flower_run(sc, tmp_path / "f", LocalGrid(nodes_for(12), fail=fail))
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "client 5" in summary["error"]


def test_failed_reply_dropped_when_asked(tmp_path):
    """on_failure=drop: the round is FedAvg over the clients that answered (n_i-weighted)."""
    def fail(msg, ctx):
        return "boom" if (msg.metadata.message_type == "train"
                          and ctx.node_config["partition-id"] == 5) else None

    sc = tiny_scenario(**{"runtime.threads": 1, "server.clients_per_round": 12,
                          "server.rounds": 1})
    res = flower_run(sc, tmp_path / "f", LocalGrid(nodes_for(12), fail=fail), on_failure="drop")
    assert res.summary["status"] == "completed"
    assert "client 5" in res.summary["failed_replies"][0]
    [rec] = res.metrics
    assert rec["failed_clients"] == [5]
    assert "boom" in rec["failures"][0]
    assert rec["clients"] == [c for c in range(12) if c != 5]
    # the expected model, from the client updates of the 11 others: x0 + sum n_i d_i / sum n_i
    s = load_scenario(sc).scenario
    fed = build_data(s)
    x0 = initial_params(s, build_flat_model(s, fed.dataset))
    jobs = [ClientJob(0, c, s.client.lr) for c in range(12) if c != 5]
    out = ClientWorker(s, fed, threads=1).run(RoundPayload(0, x0, {}), jobs, [{}] * 11)
    n = torch.tensor([float(r.num_samples) for r in out], dtype=torch.float64)
    d = torch.stack([r.delta for r in out]).double()
    expected = x0.double() + (n[:, None] * d).sum(0) / n.sum()
    assert torch.allclose(res.params.double(), expected, rtol=0, atol=1e-6)


def test_missing_and_duplicate_partitions_are_named(tmp_path):
    sc = tiny_scenario(**{"runtime.threads": 1})
    with pytest.raises(FlowerRunError, match=r"no node holds client\(s\) 3, 10-11"):
        flower_run(sc, tmp_path / "a", LocalGrid([c for c in nodes_for(12)
                                                  if c["partition-id"] not in (3, 10, 11)]),
                   node_timeout_s=0.2)
    with pytest.raises(FlowerRunError, match="partition 4 on nodes"):
        flower_run(sc, tmp_path / "b", LocalGrid([*nodes_for(12), {"partition-id": 4}]))


def test_secagg_is_refused_with_reason(tmp_path):
    with pytest.raises(ScenarioError, match="SecAgg"):
        flower_run(tiny_scenario(), tmp_path / "a", LocalGrid(nodes_for(12)), secagg=True)
    assert not (tmp_path / "a").exists()


def test_node_with_local_data_file(tmp_path):
    """A node given its samples as a file trains exactly as the node holding the partition."""
    loaded = load_scenario(tiny_scenario(**{"runtime.threads": 1}))
    sc = loaded.scenario
    fed = build_data(sc)
    ix = fed.client_indices[7]
    torch.save({"x": fed.dataset.x_train[ix], "y": fed.dataset.y_train[ix],
                "num_classes": fed.dataset.num_classes}, tmp_path / "client7.pt")
    np.savez(tmp_path / "client7.npz", x=fed.dataset.x_train[ix].numpy(),
             y=fed.dataset.y_train[ix].numpy(), num_classes=fed.dataset.num_classes)
    params = torch.randn(fed.dataset.x_train.shape[1] * fed.dataset.num_classes
                         + fed.dataset.num_classes, generator=torch.Generator().manual_seed(1))
    content = messages.encode_instruction(RoundPayload(2, params, {}), ClientJob(2, 7, 0.05), {},
                                          dump_scenario(sc))
    grid = LocalGrid([{"partition-id": 7},
                      {"partition-id": 7, "data-path": str(tmp_path / "client7.pt")},
                      {"partition-id": 7, "data-path": str(tmp_path / "client7.npz")},
                      {"partition-id": 6}])
    out = {}
    for node in grid.nodes:
        msg = Message(content, dst_node_id=node, message_type="train")
        [mid] = grid.push_messages([msg])
        out[node] = grid.replies[mid]
    ref, by_file, by_npz, wrong = (out[n] for n in grid.nodes)
    a, b, c = (messages.decode_result(r.content) for r in (ref, by_file, by_npz))
    assert a.num_samples == len(ix)
    assert a.steps > 0
    assert torch.equal(a.delta, b.delta)
    assert torch.equal(a.delta, c.delta)
    assert wrong.has_error()
    assert "partition 6" in wrong.error.reason


def test_node_finds_its_data_folder(tmp_path, monkeypatch):
    from fedflat.flower.client_app import node_data_dir

    def ctx(cfg):
        return Context(run_id=1, node_id=1, node_config=cfg, state=RecordDict(), run_config={})

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.setenv("FEDFLAT_DATA", "/node/env")
    assert node_data_dir(ctx({"data-dir": "/node/explicit"}), str(here)) == "/node/explicit"
    assert node_data_dir(ctx({}), str(here)) is None  # the scenario's folder exists here
    assert node_data_dir(ctx({}), "/server/only") == "/node/env"
    assert node_data_dir(ctx({}), None) == "/node/env"
    monkeypatch.delenv("FEDFLAT_DATA")
    assert node_data_dir(ctx({}), "/server/only") is None


# ----------------------------------------------------------------------------- app folder
def test_app_folder_is_a_valid_flower_app(tmp_path):
    from flwr.common.config import flatten_dict, validate_config
    from flwr.supercore.object_ref import load_app

    src = tmp_path / "scen.yaml"
    src.write_text(yaml.safe_dump(tiny_scenario()))
    folder = write_app(src, tmp_path / "tiny-app", overrides=["server.rounds=3"],
                       out_dir="/tmp/x", on_failure="drop")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "pyproject.toml", "scenario.yaml"]
    cfg = tomllib.loads((folder / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=folder)
    assert ok, errors
    comps = cfg["tool"]["flwr"]["app"]["components"]
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    assert isinstance(load_app(comps["serverapp"], ValueError, folder), ServerApp)
    assert isinstance(load_app(comps["clientapp"], ValueError, folder), ClientApp)
    run_config = flatten_dict(cfg["tool"]["flwr"]["app"]["config"])
    settings = settings_from_run_config(run_config)
    assert settings.out == "/tmp/x"
    assert settings.on_failure == "drop"
    want = load_scenario(src, ["server.rounds=3"]).scenario
    assert load_scenario(yaml.safe_load(settings.scenario_yaml)).scenario == want
    assert yaml.safe_load((folder / "scenario.yaml").read_text()) == want.model_dump(mode="json")
    readme = (folder / "README.md").read_text()
    assert "partition-id" in readme
    assert "flwr run" in readme
    assert "0..11" in readme
    with pytest.raises(fedflat.errors.FedflatError, match="not empty"):
        write_app(src, folder)
    from fedflat.cli import main

    assert main(["flower", "app", str(src), str(tmp_path / "cli-app")]) == 0
    assert (tmp_path / "cli-app" / "pyproject.toml").is_file()
    assert main(["flower", "app", str(src), str(tmp_path / "cli_app")]) == 2  # '_' refused
    with pytest.raises(fedflat.errors.FedflatError, match="not a valid Flower app name"):
        write_app(src, tmp_path / "1_bad")


def test_run_config_overrides_and_checks():
    s = settings_from_run_config({"scenario": "seed: 2\n", "set": "server.rounds=2; seed=5",
                                  "reply-timeout": 0.0, "on-failure": "abort"})
    assert list(s.overrides) == ["server.rounds=2", "seed=5"]
    assert s.reply_timeout_s is None
    with pytest.raises(FlowerRunError, match="no 'scenario'"):
        settings_from_run_config({})
    with pytest.raises(FlowerRunError, match="on-failure"):
        settings_from_run_config({"scenario": "seed: 1\n", "on-failure": "retry"})


# ----------------------------------------------------------------------------- engines
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flower_simulation_equals_serial(tmp_path):
    """`fedflat flower simulate` (Flower's Ray simulation engine, 2 workers) gives the
    serial backend's model and records; it runs in a fresh process because Flower's engine
    shuts Ray down when it ends."""
    sc = tiny_scenario(**{"runtime.threads": 1, "method": "scaffold",
                          "comm.uplink": {"codec": "top_k", "ratio": 0.2, "error_feedback": True}})
    src = tmp_path / "tiny.yaml"
    src.write_text(yaml.safe_dump(sc))
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "flower", "simulate", str(src),
                           "--out", str(tmp_path / "flower")], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flower simulation completed: 4/4 rounds" in proc.stdout
    serial = fedflat.run(src, out=tmp_path / "serial")
    params = torch.load(tmp_path / "flower" / "final_model.pt")
    assert torch.allclose(params, serial.params, rtol=0, atol=1e-6)
    flower_metrics = [json.loads(x) for x in
                      (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()]
    serial_metrics = [json.loads(x) for x in
                      (tmp_path / "serial" / "metrics.jsonl").read_text().splitlines()]
    same_records(flower_metrics, serial_metrics)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loopback_deployment(tmp_path):
    """scripts/flower_deploy.py: TLS SuperLink with SuperNode auth, 2 registered SuperNodes,
    `flwr run` of a tiny app, run status and metrics checked, an unregistered node refused."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "flower_deploy.py"),
                           "--workdir", str(tmp_path), "--rounds", "1"],
                          capture_output=True, text=True, env=_env(), timeout=280)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "PASS" in proc.stdout
    assert "FAIL" not in proc.stdout
