"""Per-client evaluation and fairness (issue 12): Gini and tail means against closed forms
and hand computation, the clients' own test splits, per_client.jsonl against a direct
evaluation of the saved final model, resume == uninterrupted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_scenario

import fedflat
from fedflat.data.client_test import label_mirroring_share
from fedflat.metrics.fairness import (
    gini,
    sample_clients,
    summarize,
    tail_mean,
)
from fedflat.runtime.build import build_data
from fedflat.scenario.loader import load_scenario


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


# ---------------------------------------------------------------- closed forms
@pytest.mark.parametrize("n", [2, 3, 10, 57])
def test_gini_one_among_zeros_is_n_minus_one_over_n(n):
    x = np.zeros(n)
    x[-1] = 1.0
    assert gini(x) == pytest.approx((n - 1) / n, abs=1e-12)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_gini_of_equal_values_is_zero(value):
    assert gini([value] * 7) == pytest.approx(0.0, abs=1e-12)


def test_gini_equals_the_double_sum_definition():
    x = np.random.default_rng(0).uniform(size=31)
    by_definition = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini(x) == pytest.approx(by_definition, rel=1e-12)
    # Two values a < b: G = (b − a) / (2 (a + b)).
    assert gini([0.2, 0.6]) == pytest.approx(0.4 / 1.6)


def test_tail_means_by_hand():
    x = np.random.default_rng(1).permutation(np.arange(20.0))
    assert tail_mean(x, 0.1, worst=True) == pytest.approx((0 + 1) / 2)  # 10 % of 20 = 2
    assert tail_mean(x, 0.1, worst=False) == pytest.approx((18 + 19) / 2)
    # ⌈1.5⌉ = 2 of 15; fewer than 10 clients: the single worst one.
    assert tail_mean(np.arange(15.0), 0.1) == pytest.approx(0.5)
    assert tail_mean([0.9, 0.2, 0.5], 0.1) == pytest.approx(0.2)


def test_summary_leaves_out_clients_without_test_data():
    rows = [{"n": 4, "accuracy": 0.5, "loss": 1.0}, {"n": 0, "accuracy": None, "loss": None},
            {"n": 2, "accuracy": 1.0, "loss": 0.0, "local_accuracy": 0.75}]
    s = summarize(rows)
    assert s["per_client/accuracy_mean"] == pytest.approx(0.75)
    assert s["per_client/accuracy_std"] == pytest.approx(0.25)  # population std of (0.5, 1)
    assert s["per_client/accuracy_worst10"] == pytest.approx(0.5)
    assert s["per_client/accuracy_best10"] == pytest.approx(1.0)
    assert s["per_client/accuracy_gini"] == pytest.approx(0.5 / 3)  # (b − a) / (2 (a + b))
    assert s["per_client/local_accuracy_mean"] == pytest.approx(0.75)
    assert s["per_client/local_clients"] == 1


# ---------------------------------------------------------------- splits
def test_label_matched_test_split_is_a_disjoint_proportional_cover():
    rng = np.random.default_rng(2)
    y_train = rng.integers(0, 4, size=400)
    y_test = rng.integers(0, 4, size=100)
    # Client 0 holds only classes 0/1, client 1 only class 2, client 2 the rest.
    owners = np.where(y_train < 2, 0, np.where(y_train == 2, 1, 2))
    owners[(y_train == 0) & (rng.uniform(size=400) < 0.5)] = 2  # class 0 shared by 0 and 2
    clients = [np.flatnonzero(owners == i) for i in range(3)]
    splits = label_mirroring_share(y_train, y_test, clients, 4, seed=5)
    flat = np.concatenate(splits)
    assert len(flat) == len(set(flat.tolist())) == len(y_test)  # disjoint, every test sample
    assert set(y_test[splits[1]].tolist()) == {2}
    assert set(y_test[splits[0]].tolist()) <= {0, 1}
    for c in range(4):  # each client's share of class c is its training share, to within one
        total_train = (y_train == c).sum()
        total_test = (y_test == c).sum()
        for i, ix in enumerate(splits):
            share = (y_train[clients[i]] == c).sum() / total_train * total_test
            assert abs((y_test[ix] == c).sum() - share) < 1
    again = label_mirroring_share(y_train, y_test, clients, 4, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(splits, again, strict=True))


def test_client_sample_is_fixed_and_distinct():
    s = sample_clients(100, 7, seed=3)
    assert len(set(s.tolist())) == 7
    assert list(s) == sorted(s)
    assert np.array_equal(s, sample_clients(100, 7, seed=3))
    assert np.array_equal(sample_clients(5, 7, seed=3), np.arange(5))


# ---------------------------------------------------------------- end to end
def _scenario(**over):
    return tiny_scenario(**{"eval.per_client": True, "output.plots": False, **over})


def test_per_client_rows_equal_direct_evaluation_of_the_final_model(tmp_path):
    sc = _scenario()
    res = fedflat.run(sc, out=tmp_path / "run")
    rows = _rows(res.run_dir / "per_client.jsonl")
    assert sorted({r["round"] for r in rows}) == [1, 3]  # eval.every 2, and the last round
    final = [r for r in rows if r["round"] == 3]
    assert [r["client_id"] for r in final] == list(range(12))
    # Independent evaluation: the synthetic devices' own test data, logits by hand.
    ds = build_data(load_scenario(sc).scenario).dataset
    w = torch.load(res.run_dir / "final_model.pt")
    d, k = ds.x_train.shape[1], ds.num_classes
    weight, bias = w[: d * k].reshape(k, d), w[d * k:]
    for r in final:
        ix = torch.as_tensor(ds.test_groups[r["client_id"]])
        x, y = ds.x_test[ix], ds.y_test[ix]
        logits = x @ weight.T + bias
        assert r["n"] == len(y)
        assert r["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        loss = torch.nn.functional.cross_entropy(logits, y)
        assert r["loss"] == pytest.approx(float(loss), rel=1e-5)
    # The summaries in metrics.jsonl are those of the rows.
    last = res.metrics[-1]
    acc = np.array([r["accuracy"] for r in final])
    assert last["per_client/accuracy_mean"] == pytest.approx(acc.mean())
    assert last["per_client/accuracy_worst10"] == pytest.approx(np.sort(acc)[:2].mean())
    # Local models: a client's row names its last participation before the evaluation.
    for r in final:
        took_part = [m["round"] for m in res.metrics if r["client_id"] in m["clients"]]
        if took_part:
            assert r["local_round"] == max(took_part)
            assert 0.0 <= r["local_accuracy"] <= 1.0
        else:
            assert "local_accuracy" not in r


def test_resumed_per_client_file_equals_uninterrupted(tmp_path):
    res = fedflat.run(_scenario(), out=tmp_path / "full")
    cut = tmp_path / "cut"
    shutil.copytree(res.run_dir, cut)
    # As if killed after round 3's checkpoint: the last round is run again on resume.
    (cut / "final_model.pt").unlink()
    (cut / "checkpoints" / "round_000004.pt").unlink()
    with open(cut / "per_client.jsonl", "a") as f:
        f.write('{"round": 3, "client_id"')  # a line cut short
    fedflat.resume(cut)
    assert (cut / "per_client.jsonl").read_text() == (res.run_dir / "per_client.jsonl").read_text()


def test_per_client_sample_and_vmap_equal_serial(tmp_path):
    over = {"eval.per_client_sample": 5, "eval.every": 1, "server.rounds": 2}
    serial = fedflat.run(_scenario(**over), out=tmp_path / "serial")
    rows = _rows(serial.run_dir / "per_client.jsonl")
    ids = [[r["client_id"] for r in rows if r["round"] == t] for t in (0, 1)]
    assert len(ids[0]) == 5
    assert ids[0] == ids[1]
    vm = fedflat.run(_scenario(**over, **{"runtime.backend": "vmap"}), out=tmp_path / "vmap")
    for a, b in zip(rows, _rows(vm.run_dir / "per_client.jsonl"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)


def test_fairness_plots(tmp_path):
    from fedflat.report.plots import plot_run

    res = fedflat.run(_scenario(), out=tmp_path / "run")
    names = {p.name for p in plot_run(res.run_dir)}
    assert {"per_client_accuracy_hist.png", "per_client_worst10_vs_round.png"} <= names
    for name in ("per_client_accuracy_hist.png", "per_client_worst10_vs_round.png"):
        assert (res.run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



@pytest.mark.ray
@pytest.mark.slow
def test_per_client_rows_on_ray_equal_serial(tmp_path, ray_session):
    sc = _scenario()
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}},
                         out=tmp_path / "r")
    assert (serial.run_dir / "per_client.jsonl").read_text() == \
        (on_ray.run_dir / "per_client.jsonl").read_text()
