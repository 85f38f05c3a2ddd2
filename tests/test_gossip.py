"""Decentralized training: gossip and CHOCO invariants, D-SGD == FedAvg on the complete
graph, the topology: block's refusals, resume, DP-SGD per node."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_scenario

import fedflat
from fedflat.comm.codecs import make_codec
from fedflat.decentralized import topology as topo
from fedflat.decentralized.gossip import choco_step, consensus_distance, gossip_step
from fedflat.errors import ScenarioError
from fedflat.rng import stream
from fedflat.scenario.loader import load_scenario


def _w(kind: str, n: int) -> torch.Tensor:
    return torch.from_numpy(topo.mixing_matrix(topo.graph(kind, n), "metropolis_hastings"))


# ------------------------------------------------------------------------- pure gossip
def test_consensus_distance_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])  # mean (1, 1)
    assert consensus_distance(x) == pytest.approx((2 + 2 + 4) / 3)


@pytest.mark.parametrize("n", [8, 12])
def test_consensus_decays_by_lambda2_squared_per_step(n):
    # No gradient (lr 0): only gossip acts. A deviation along the λ2 eigenvector
    # cos(2πi/n) of the ring decays by exactly λ2² per step.
    lam2 = (1 + 2 * math.cos(2 * math.pi / n)) / 3
    w = _w("ring", n).to(torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    x = 5.0 + torch.outer(torch.cos(2 * math.pi * i / n), torch.tensor([1.0, -2.0, 0.5],
                                                                     dtype=torch.float64))
    d0 = consensus_distance(x)
    for s in range(1, 6):
        x = gossip_step(x, w)
        assert consensus_distance(x) == pytest.approx(d0 * lam2 ** (2 * s), rel=1e-9)
    assert x.mean(dim=0)[0] == pytest.approx(5.0)


def test_consensus_ratio_bounded_by_rho_squared_and_reaches_it():
    n = 16
    w = _w("torus", n).to(torch.float64)
    rho = topo.closed_form_second_eigenvalue("torus", n)  # 4 x 4: (1 + 2 + 0)/5 = 0.6
    assert rho == pytest.approx(0.6)
    x = torch.randn(n, 7, generator=stream(0, "eval", 99), dtype=torch.float64)
    mean0 = x.mean(dim=0)
    ratios = []
    for _ in range(25):  # beyond, rounding (not mixing) sets the residual
        d = consensus_distance(x)
        x = gossip_step(x, w)
        ratios.append(consensus_distance(x) / d)
    assert max(ratios) <= rho**2 * (1 + 1e-6)
    assert ratios[-1] == pytest.approx(rho**2, rel=1e-3)
    assert torch.allclose(x.mean(dim=0), mean0, atol=1e-12)  # doubly stochastic: mean kept


def test_choco_with_identity_codec_is_plain_gossip():
    n, d = 10, 33
    w = _w("ring", n)
    x = torch.randn(n, d, generator=stream(1, "eval", 5))
    plain, choco = x.clone(), x.clone()
    x_hat = torch.zeros_like(x)
    codec = make_codec("fp32")
    gens = [stream(1, "codec", 0, i) for i in range(n)]
    for _ in range(5):
        plain = gossip_step(plain, w)
        out = choco_step(choco, x_hat, w, codec, 1.0, gens)
        # The exchange makes the public copies exact (x̂ = the models before mixing).
        assert torch.allclose(out.x_hat, choco, atol=1e-6)
        choco, x_hat = out.x, out.x_hat
        assert out.message_nbytes == [4 + 4 * d] * n  # header + fp32 values
        assert torch.allclose(choco, plain, atol=1e-6)


def test_choco_lossy_codec_keeps_the_mean_and_reaches_consensus():
    n, d = 8, 50
    w = _w("ring", n)
    x = torch.randn(n, d, generator=stream(2, "eval", 5), dtype=torch.float64)
    mean0 = x.mean(dim=0)
    x_hat = torch.zeros_like(x)
    codec = make_codec("top_k", ratio=0.2)
    d0 = consensus_distance(x)
    for t in range(400):
        out = choco_step(x, x_hat, w, codec, 0.2, [stream(2, "codec", t, i) for i in range(n)])
        x, x_hat = out.x, out.x_hat
    assert out.message_nbytes == [4 + 8 * 10] * n  # header + 10 float32 values + int32 ids
    assert torch.allclose(x.mean(dim=0), mean0, atol=1e-10)
    assert consensus_distance(x) < 1e-6 * d0


# ------------------------------------------------------------------------- runs
def _gossip(**over) -> dict:
    base = {"topology.kind": "ring", "topology.local_steps": 1, "server.rounds": 3,
            "eval.every": 3, "output.plots": False}
    return tiny_scenario(**{**base, **over})


@pytest.mark.parametrize("steps", [1, 3])
def test_complete_graph_dsgd_equals_fedavg_all_clients_uniform(tmp_path, steps):
    fedavg = fedflat.run(tiny_scenario(**{
        "server.rounds": 3, "server.clients_per_round": 12, "client.local_steps": steps,
        "server.aggregation.weighting": "uniform", "eval.every": 3, "output.plots": False}),
        out=tmp_path / "fa")
    dsgd = fedflat.run(_gossip(**{"topology.kind": "complete", "topology.mixing": "uniform",
                                  "topology.local_steps": steps}), out=tmp_path / "ds")
    assert (fedavg.params - dsgd.params).abs().max() <= 1e-6
    nodes = torch.load(dsgd.run_dir / "final_node_models.pt")
    assert nodes.shape == (12, fedavg.params.numel())
    assert (nodes - fedavg.params).abs().max() <= 1e-6
    assert dsgd.metrics[-1]["consensus_distance"] <= 1e-12
    assert dsgd.metrics[-1]["test_accuracy"] == pytest.approx(
        fedavg.metrics[-1]["test_accuracy"], abs=1 / 100)


def test_choco_identity_run_equals_plain_gossip_run(tmp_path):
    plain = fedflat.run(_gossip(), out=tmp_path / "p")
    choco = fedflat.run(_gossip(**{"topology.compression": {"codec": "fp32"}}),
                        out=tmp_path / "c")
    assert (plain.params - choco.params).abs().max() <= 1e-6
    for a, b in zip(plain.metrics, choco.metrics, strict=True):
        assert a["consensus_distance"] == pytest.approx(b["consensus_distance"], rel=1e-4)
        assert a["bytes_per_edge"] == b["bytes_per_edge"]


def test_bytes_per_edge_and_metrics(tmp_path):
    res = fedflat.run(_gossip(**{"topology.gossip_steps": 2}), out=tmp_path / "r")
    d = res.params.numel()
    n = 12
    rec = res.metrics[-1]
    assert rec["bytes_per_edge"] == 4 + 4 * d  # one message: the fp32 model and a header
    assert rec["bytes_up"] == 2 * 2 * n * rec["bytes_per_edge"]  # 2 steps, 2n directed
    assert rec["bytes_up_total"] == 3 * rec["bytes_up"]
    assert rec["bytes_down_total"] == 0
    assert rec["spectral_gap"] == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3)
    assert rec["clients"] == list(range(n))
    assert rec["consensus_distance"] > 0
    assert 0 <= rec["node_test_accuracy_min"] <= rec["node_test_accuracy_mean"] <= 1
    assert "test_accuracy" in rec
    lines = (res.run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["bytes_per_edge"] == rec["bytes_per_edge"]
    k = math.ceil(0.1 * d)
    topk = fedflat.run(_gossip(**{"topology.compression": {"codec": "top_k", "ratio": 0.1},
                                  "topology.gamma": 0.3}), out=tmp_path / "k")
    assert topk.metrics[-1]["bytes_per_edge"] == 4 + 8 * k


def test_denser_graph_reaches_closer_consensus(tmp_path):
    dist = {}
    for kind in ("ring", "exponential", "complete"):
        res = fedflat.run(_gossip(**{"topology.kind": kind, "server.rounds": 4}),
                          out=tmp_path / kind)
        dist[kind] = res.metrics[-1]["consensus_distance"]
    assert dist["ring"] > dist["exponential"] > dist["complete"]


def test_random_graphs_are_seeded(tmp_path):
    from fedflat.decentralized.runner import Mixing

    def mixing(kind, seed):
        return Mixing(load_scenario(_gossip(**{"topology.kind": kind, "seed": seed})).scenario,
                      12)

    er = [mixing("erdos_renyi", s).static[1] for s in (3, 3, 9)]
    assert np.array_equal(er[0], er[1])
    assert not np.array_equal(er[0], er[2])
    rm, other = mixing("random_matching", 3), mixing("random_matching", 9)
    assert np.array_equal(rm.at(2, 0)[1], mixing("random_matching", 3).at(2, 0)[1])
    assert not np.array_equal(rm.at(2, 0)[1], rm.at(3, 0)[1])  # a new matching each round
    assert not np.array_equal(rm.at(2, 0)[1], rm.at(2, 1)[1])  # and each gossip step
    assert not np.array_equal(rm.at(2, 0)[1], other.at(2, 0)[1])
    sc = _gossip(**{"topology.kind": "random_matching", "server.rounds": 2, "eval.every": 2})
    a = fedflat.run(sc, out=tmp_path / "a")
    b = fedflat.run(sc, out=tmp_path / "b")
    assert torch.equal(a.params, b.params)


def test_resumed_gossip_run_equals_uninterrupted(tmp_path):
    sc = _gossip(**{"server.rounds": 6, "output.keep_checkpoints": 10,
                    "topology.compression": {"codec": "qsgd", "levels": 4},
                    "topology.gamma": 0.2, "client.oracle.name": "sam",
                    "client.oracle.rho": 0.05})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    for p in (again.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 3:
            p.unlink()
    (again.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    assert torch.equal(torch.load(resumed.run_dir / "final_node_models.pt"),
                       torch.load(reference.run_dir / "final_node_models.pt"))
    assert [m["consensus_distance"] for m in resumed.metrics] == \
        [m["consensus_distance"] for m in reference.metrics]


@pytest.mark.slow  # the per-client ε of the accountant dominates (~10 s here)
def test_dp_sgd_per_node_is_accounted(tmp_path):
    small = {"data.num_clients": 4, "server.clients_per_round": 4, "server.rounds": 2,
             "eval.every": 2}
    sc = _gossip(**small, **{"privacy.sample_level.enabled": True,
                             "privacy.sample_level.noise_multiplier": 1.0,
                             "privacy.sample_level.clip_norm": 1.0,
                             "privacy.sample_level.delta": 1e-5})
    res = fedflat.run(sc, out=tmp_path / "dp")
    plain = fedflat.run(_gossip(**small), out=tmp_path / "plain")
    assert not torch.allclose(res.params, plain.params)
    priv = json.loads((res.run_dir / "privacy.json").read_text())["sample_level"]
    eps = priv["epsilon_per_client"]
    assert len(eps) == 4
    assert all(0 < e < math.inf for e in eps)
    assert 0 <= res.metrics[-1]["client/dp_frac_clipped"] <= 1


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("over", "key"), [
    ({"server.aggregation.rule": "median"}, "server.aggregation.rule"),
    ({"privacy.user_level.enabled": True, "privacy.user_level.noise_multiplier": 1.0},
     "privacy.user_level.enabled"),
    ({"runtime.backend": "ray"}, "runtime.backend"),
    ({"server.optimizer": "fedadam"}, "server.optimizer"),
    ({"client.correction.scaffold": True}, "client.correction.scaffold"),
    ({"comm.uplink": {"codec": "fp16"}}, "comm"),
    ({"attack.kind": "sign_flip", "attack.fraction": 0.2}, "attack.kind"),
    ({"topology.kind": "torus"}, "data.num_clients"),
    ({"topology.compression": {"codec": "top_k", "ratio": 0.1, "error_feedback": True}},
     "topology.compression.error_feedback"),
    ({"topology.local_steps": 2, "client.local_steps": 3}, "topology.local_steps"),
    ({"topology.kind": "erdos_renyi", "topology.mixing": "uniform"}, "topology.mixing"),
    ({"topology.kind": "random_matching", "topology.mixing": "uniform",
      "data.num_clients": 11}, "topology.mixing"),
])
def test_topology_refuses_server_keys(over, key):
    if key == "data.num_clients":  # 12 = 3 x 4 is a valid torus; 8 nodes are too few
        over = {**over, "data.num_clients": 8, "server.clients_per_round": 4}
    with pytest.raises(ScenarioError) as info:
        load_scenario(_gossip(**over))
    assert key in str(info.value)


def test_topology_accepts_clients_per_round_above_num_clients():
    # Every node trains every round; server.clients_per_round is not checked then.
    sc = load_scenario(_gossip(**{"server.clients_per_round": 50})).scenario
    assert sc.topology.kind == "ring"


def test_torus_rows_must_divide(tmp_path):
    with pytest.raises(ScenarioError, match=r"topology\.rows"):
        load_scenario(_gossip(**{"topology.kind": "torus", "topology.rows": 5}))
    res = fedflat.run(_gossip(**{"topology.kind": "torus", "topology.rows": 3}),
                      out=tmp_path / "t")
    rho = max(abs(v) for v in np.sort(topo.torus_eigenvalues(3, 4))[:-1])
    assert res.metrics[-1]["spectral_gap"] == pytest.approx(1 - rho)


def test_saved_scenario_has_resolved_local_steps(tmp_path):
    res = fedflat.run(_gossip(**{"topology.local_steps": 2}), out=tmp_path / "r")
    assert res.metrics[-1]["local_steps_mean"] == 2
    saved = load_scenario(Path(res.run_dir) / "scenario.yaml").scenario
    assert saved.client.local_steps == 2
    assert saved.server.clients_per_round == 12  # every node, every round


@pytest.mark.slow  # σ calibration and per-node ε (~15 s here)
def test_dp_target_epsilon_is_calibrated_for_every_round(tmp_path):
    # Each node trains every round: σ must be calibrated for `rounds` participations, so no
    # node runs out of budget before the end and none exceeds ε.
    # clients_per_round 1 of 4 would calibrate σ for 2 participations (the 0.9 quantile
    # of Binomial(4, 1/4)), and nodes would run out of budget after round 2.
    small = {"data.num_clients": 4, "server.rounds": 4, "eval.every": 4,
             "server.clients_per_round": 1}
    sc = _gossip(**small, **{"privacy.sample_level.enabled": True,
                             "privacy.sample_level.participation_quantile": 0.9,
                             "privacy.sample_level.epsilon": 4.0,
                             "privacy.sample_level.clip_norm": 1.0,
                             "privacy.sample_level.delta": 1e-5})
    res = fedflat.run(sc, out=tmp_path / "dp")
    assert all(m["budget_exhausted"] == [] for m in res.metrics)
    assert all(m["clients"] == [0, 1, 2, 3] for m in res.metrics)
    eps = json.loads((res.run_dir / "privacy.json").read_text())["sample_level"][
        "epsilon_per_client"]
    assert max(eps) <= 4.0 + 1e-9
    assert max(eps) > 2.0  # the budget is used, not wasted on too much noise


def test_flower_app_refuses_topology(tmp_path):
    pytest.importorskip("tomli_w")
    from fedflat.flower.app import write_app

    with pytest.raises(ScenarioError, match=r"topology\.kind"):
        write_app(_gossip(), tmp_path / "app")
    assert not (tmp_path / "app").exists()


@pytest.mark.slow
def test_reproduce_gossip_quick_table(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_gossip.py"
    spec = importlib.util.spec_from_file_location("reproduce_gossip", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "table.md"
    mod.main(["--quick", "--rounds", "2", "--out", str(out)])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ring |")]
    assert len(rows) == 1
    rho = (1 + 2 * math.cos(2 * math.pi / 16)) / 3
    cells = [c.strip() for c in rows[0].split("|")]
    assert float(cells[2]) == pytest.approx(rho, abs=1e-6)
    assert float(cells[3]) == pytest.approx(rho, abs=1e-6)
    assert "closed forms (all four graphs; |Δρ| < 1e-9): yes" in text
