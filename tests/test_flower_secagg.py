"""fedflat under Flower's SecAgg+: the protocol's result against the serial backend, with a
tolerance derived from SecAgg+'s quantiser, and the refusals of what cannot run under it.

Tolerance. SecAgg+ stochastically rounds each client's w_i/W · Δ_i to a grid of step
2c/T (error < one step per coordinate), so the mean delta of a round of k clients is off
by at most k · (2c/T) / Σ_i (w_i/W) per coordinate, i.e. by sqrt(d) times that in L2.
With server lr 1 (FedAvg) the model moves by that mean. Local SGD on a convex
L-smooth loss with lr <= 2/L is a non-expansive map (co-coercivity of the gradient), and
so is a convex combination of such maps; the error of an earlier round therefore does
not grow in a later one and the final L2 difference is at most the sum over rounds.
For multinomial logistic regression L <= (max ||x||^2 + 1) / 2 (the softmax Jacobian has
norm <= 1/2), which the tests check before relying on it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import uuid

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from conftest import REPO, tiny_scenario
from flwr.app import Context, Error, Message, RecordDict

import fedflat
from fedflat.errors import ScenarioError
from fedflat.flower.client_app import ClientSettings
from fedflat.flower.secagg import (
    check_secagg,
    decode_fit,
    encode_fit,
    make_secagg_client_app,
    run_secagg_server,
)
from fedflat.flower.server_app import ServerSettings
from fedflat.runtime.build import build_data
from fedflat.runtime.worker import ClientJob, RoundPayload
from fedflat.scenario.flower import FlowerConfig
from fedflat.scenario.loader import dump_scenario, load_scenario

CLIP, LEVELS = 8.0, 2**22  # Flower's defaults = FlowerConfig's


def secagg_scenario(**over):
    """6 clients, 4 per round, 2 rounds, plain SGD with lr small enough for the
    non-expansiveness argument of the module docstring."""
    return tiny_scenario(**{"data.num_clients": 6, "server.rounds": 2, "client.lr": 0.02,
                            "eval.every": 1, "output.plots": False, "runtime.threads": 1,
                            **over})


class SecAggLocalGrid:
    """A Grid whose nodes run the SecAgg+ ClientApp in this process (a Context each, kept
    across messages as Flower's runtimes keep it; exceptions become error replies)."""

    def __init__(self, n):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.app = make_secagg_client_app(ClientSettings(threads=1))
        self.nodes = {9000 + k: Context(run_id=1, node_id=9000 + k,
                                        node_config={"partition-id": k, "num-partitions": n},
                                        state=RecordDict(), run_config={}) for k in range(n)}
        self.replies = {}
        self.sent = []
        self.answered = []

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = str(uuid.uuid4())
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            try:  # a node gets its own copy, as over a network (the mod pops config keys)
                reply = self.app(copy.deepcopy(m), self.nodes[m.metadata.dst_node_id])
            except Exception as exc:  # what a ClientApp runtime turns into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=m)
            self.replies[mid] = reply
            self.answered.append(reply)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def round_bounds(sc_dict, metrics):
    """Per round: the L2 bound sqrt(d) k (2c/T) / Σ w_i/W on the error of the mean delta."""
    sc = load_scenario(sc_dict).scenario
    fed = build_data(sc)
    sizes = [len(ix) for ix in fed.client_indices]
    x = fed.dataset.x_train
    smooth = 0.5 * (float((x.double() ** 2).sum(1).max()) + 1.0)
    assert sc.client.lr * smooth <= 2.0, "local SGD must be non-expansive for this tolerance"
    d = x.shape[1] * fed.dataset.num_classes + fed.dataset.num_classes
    w_max = max(sizes)
    out = []
    for rec in metrics:
        ws = [sizes[c] for c in rec["clients"]]
        out.append(math.sqrt(d) * len(ws) * (2 * CLIP / LEVELS) / (sum(ws) / w_max))
    return out


def check_close(sc_dict, params, metrics, serial):
    assert [r["clients"] for r in metrics] == [r["clients"] for r in serial.metrics]
    # round 0 starts from the same model: the clients' losses are the same numbers
    assert metrics[0]["client_train_loss"] == serial.metrics[0]["client_train_loss"]
    bounds = round_bounds(sc_dict, serial.metrics)
    # 1.01: the weights are quantised too (relative error <= W / (2 w_i T) ~ 1e-7)
    assert abs(metrics[0]["update_norm"] - serial.metrics[0]["update_norm"]) <= 1.01 * bounds[0]
    diff = float((params.double() - serial.params.double()).norm())
    assert diff <= 1.01 * sum(bounds), (diff, bounds)
    # the tolerance is far below how far one round moves the model
    assert sum(bounds) < 1e-2 * serial.metrics[0]["update_norm"]
    assert all(r["client/secagg_clipped_fraction"] == 0.0 for r in metrics)


# ----------------------------------------------------------------------------- fast
def test_fit_message_round_trip():
    g = torch.Generator().manual_seed(0)
    payload = RoundPayload(round=3, params=torch.randn(11, generator=g),
                           broadcast={"prev_global_update": torch.randn(11, generator=g)})
    job = ClientJob(round=3, client_id=5, lr=0.125, max_steps=4)
    fit = encode_fit(payload, job, "seed: 1\n",
                     fedflat.flower.messages.scenario_digest("seed: 1\n"),
                     weighting="samples", max_weight_=40.0, clipping_range=8.0)
    from flwr.common import parameters_to_ndarrays

    back = decode_fit(parameters_to_ndarrays(fit.parameters), fit.config)
    assert back.job == job
    assert back.payload.round == 3
    assert torch.equal(back.payload.params, payload.params)
    assert torch.equal(back.payload.broadcast["prev_global_update"],
                       payload.broadcast["prev_global_update"])
    with pytest.raises(fedflat.flower.messages.MessageError, match="SHA-256"):
        decode_fit(parameters_to_ndarrays(fit.parameters), {**fit.config, "fedflat.yaml": "x"})


def test_secagg_protocol_in_process_close_to_serial(tmp_path):
    """The full SecAgg+ protocol (Flower's workflow and mod) over in-process nodes."""
    sc = secagg_scenario()
    serial = fedflat.run(sc, out=tmp_path / "serial")
    grid = SecAggLocalGrid(6)
    settings = ServerSettings(scenario_yaml=dump_scenario(load_scenario(sc).scenario),
                              out=tmp_path / "sa", node_timeout_s=5.0, poll_s=0.0, secagg=True)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    res = run_secagg_server(grid, ctx, settings)
    check_close(sc, res.params, res.metrics, serial)
    summary = json.loads((tmp_path / "sa" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["secagg"]["max_weight"] > 1
    # 2 rounds x 4 clients went through the 4 protocol stages
    stages = [m.content.config_records["secaggplus_configs"].get("stage") for m in grid.sent
              if m.metadata.message_type == "train"]
    assert {st: stages.count(st) for st in set(stages)} == {
        "setup": 8, "share_keys": 8, "collect_masked_vectors": 8, "unmask": 8}
    # no reply carried an array in the clear; 8 carried a masked vector
    train = [r for r in grid.answered if r.metadata.message_type == "train"]
    assert all(not rec for r in train for rec in r.content.array_records.values())
    masked = [r for r in train if "masked_params" in r.content.config_records[
        "secaggplus_configs"]]
    assert len(masked) == 8


def test_refusals_name_the_key():
    cases = {
        "server.aggregation.rule": {"server.aggregation.rule": "median"},
        "client.correction.scaffold": {"method": "scaffold"},
        "attack.kind": {"attack.kind": "sign_flip", "attack.fraction": 0.2},
        "privacy.user_level.enabled": {"server.sampling": "poisson", "privacy.user_level": {
            "enabled": True, "noise_multiplier": 1.0}},
        "comm.uplink.codec": {"comm.uplink": {"codec": "top_k", "ratio": 0.2}},
    }
    for key, over in cases.items():
        with pytest.raises(ScenarioError, match="SecAgg") as err:
            check_secagg(load_scenario(secagg_scenario(**over)).scenario)
        assert err.value.key == key
        assert key in str(err.value)
    check_secagg(load_scenario(secagg_scenario(**{"server.optimizer": "fedadam"})).scenario)
    check_secagg(load_scenario(secagg_scenario(**{"attack.kind": "label_flip",
                                                  "attack.fraction": 0.2})).scenario)


def test_simulate_refuses_before_starting(tmp_path):
    from fedflat.flower.simulate import simulate

    with pytest.raises(ScenarioError, match="rule 'median' needs the individual client updates"):
        simulate(secagg_scenario(**{"server.aggregation.rule": "median"}), out=tmp_path / "a",
                 secagg=True)
    with pytest.raises(ScenarioError, match="SCAFFOLD"):
        simulate(secagg_scenario(method="scaffold"), out=tmp_path / "b", secagg=True)
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()


def test_simulate_refuses_inside_a_running_ray(tmp_path, ray_session):
    """Flower's engine shuts Ray down when it ends: with Ray up (the test session's), a valid
    scenario is refused before any run folder exists, and Ray is left running."""
    from fedflat.flower.server_app import FlowerRunError
    from fedflat.flower.simulate import simulate

    with pytest.raises(FlowerRunError, match="fresh process"):
        simulate(secagg_scenario(), out=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    assert ray_session.is_initialized()


def test_flower_config_checks():
    assert FlowerConfig().secagg is False
    with pytest.raises(ValueError, match="less than secagg_num_shares"):
        FlowerConfig(secagg_num_shares=5, secagg_reconstruction_threshold=5)
    with pytest.raises(ValueError, match="> 2"):
        FlowerConfig(secagg_num_shares=2)
    with pytest.raises(ValueError, match="secaggg"):
        FlowerConfig(secaggg=True)


# ----------------------------------------------------------------------------- engine
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flower_simulate_secagg_close_to_serial(tmp_path):
    """`fedflat flower simulate --secagg` (Ray engine, SecAgg+ on every round) lands within
    the quantisation bound of the serial model; a robust rule is refused by the CLI."""
    sc = secagg_scenario()
    src = tmp_path / "tiny.yaml"
    src.write_text(yaml.safe_dump(sc))
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "flower", "simulate", str(src),
                           "--secagg", "--out", str(tmp_path / "sa")], capture_output=True,
                          text=True, env=_env(), cwd=tmp_path, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flower simulation completed: 2/2 rounds" in proc.stdout
    serial = fedflat.run(src, out=tmp_path / "serial")
    params = torch.load(tmp_path / "sa" / "final_model.pt")
    metrics = [json.loads(x) for x in (tmp_path / "sa" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["round"] >= 0]  # the training rounds (as serial.metrics)
    check_close(sc, params, metrics, serial)
    bad = tmp_path / "median.yaml"
    bad.write_text(yaml.safe_dump(secagg_scenario(**{"server.aggregation.rule": "median"})))
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "flower", "simulate", str(bad),
                           "--secagg"], capture_output=True, text=True, env=_env(), cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 2
    assert "needs the individual client updates" in proc.stderr
