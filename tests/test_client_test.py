"""One definition of a client's test split (fedflat.data.client_test, eval.client_test):
hand counts of the label-mirroring share, disjointness from the training data, seeds,
``auto`` as before the key existed, and personalization and eval.per_client scoring the
global model on the same examples (checked against final_model.pt by hand)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import set_keys, tiny_scenario

import fedflat
from fedflat.data.client_test import label_mirroring_share, resolve_mode
from fedflat.errors import ScenarioError
from fedflat.runtime.build import build_data
from fedflat.scenario.loader import load_scenario


def _digits(**over) -> dict:
    sc = {
        "name": "ct", "seed": 1,
        "data": {"dataset": "digits", "num_clients": 10,
                 "partition": {"method": "shards", "shards_per_client": 2}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 16, "local_steps": 5},
        "server": {"rounds": 3, "clients_per_round": 5},
        "runtime": {"threads": 1}, "eval": {"every": 3},
        "output": {"checkpoint_every": 0, "plots": False, "progress": False},
    }
    return set_keys(sc, over)


def _fed(sc: dict):
    return build_data(load_scenario(sc).scenario)


# ---------------------------------------------------------------- hand counts
def test_label_share_by_hand():
    # Client 0 trains on three 0s and one 1, client 1 on one 0 and three 1s.
    y_train = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    clients = [np.arange(0, 4), np.arange(4, 8)]
    # Test set: four 0s, four 1s, three 2s (nobody trains on class 2).
    y_test = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    a, b = label_mirroring_share(y_train, y_test, clients, 3, seed=0)
    assert np.bincount(y_test[a], minlength=3).tolist() == [3, 1, 0]  # 4·3/4, 4·1/4
    assert np.bincount(y_test[b], minlength=3).tolist() == [1, 3, 0]
    assert not set(a.tolist()) & set(b.tolist())
    # Rounding: three 0s split 3/4 : 1/4 = 2.25 : 0.75; the larger remainder (0.75) gets
    # the third sample, so 2 : 1.
    y_test = np.array([0, 0, 0])
    a, b = label_mirroring_share(y_train, y_test, clients, 3, seed=0)
    assert (len(a), len(b)) == (2, 1)


# ---------------------------------------------------------------- splits of a run's data
def test_holdout_is_removed_from_training_and_dataset_share_keeps_it():
    share = _fed(_digits(**{"eval.client_test": "dataset_share"}))
    hold = _fed(_digits(**{"eval.client_test": "local_holdout", "eval.holdout_fraction": 0.3}))
    assert (share.client_test.mode, share.client_test.source) == ("dataset_share", "test")
    assert (hold.client_test.mode, hold.client_test.source) == ("local_holdout", "train")
    trained = set(np.concatenate(hold.client_indices).tolist())
    for part, tr, te in zip(share.client_indices, hold.client_indices,
                            hold.client_test.indices, strict=True):
        assert len(te) == int(np.ceil(0.3 * len(part)))
        assert sorted([*tr.tolist(), *te.tolist()]) == sorted(part.tolist())
        assert not set(te.tolist()) & trained  # no client trains on a held-out example
    # dataset_share: every test example in at most one client's split, training unchanged.
    flat = np.concatenate(share.client_test.indices)
    assert len(flat) == len(set(flat.tolist()))
    assert flat.max() < len(share.dataset.y_test)
    ds = share.dataset
    for part, te in zip(share.client_indices, share.client_test.indices, strict=True):
        assert set(ds.y_test[te].tolist()) <= set(ds.y_train[part].tolist())


def test_natural_dataset_share_is_the_datasets_own_test_data():
    fed = _fed(tiny_scenario(**{"eval.client_test": "dataset_share"}))
    own = fed.dataset.test_groups[: fed.num_clients]
    assert all(np.array_equal(a, b) for a, b in zip(fed.client_test.indices, own, strict=True))


@pytest.mark.parametrize("mode", ["dataset_share", "local_holdout"])
def test_splits_are_determined_by_the_seed(mode):
    def splits(seed):
        fed = _fed(_digits(seed=seed, **{"eval.client_test": mode,
                                         "data.partition": {"method": "iid"}}))
        return fed.client_test.indices

    a, again, other = splits(1), splits(1), splits(2)
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, other, strict=True))


def test_auto_is_what_each_consumer_used_before():
    assert resolve_mode("auto", personalized=False, own_test_data=False) == "dataset_share"
    assert resolve_mode("auto", personalized=True, own_test_data=False) == "local_holdout"
    assert resolve_mode("auto", personalized=True, own_test_data=True) == "dataset_share"
    assert _fed(_digits()).client_test.mode == "dataset_share"
    pz = _fed(_digits(**{"personalization.method": "finetune"}))
    assert pz.client_test.mode == "local_holdout"
    assert pz.client_test.indices[0].size == int(np.ceil(0.2 * (pz.client_indices[0].size
                                                                 + pz.client_test.indices[0].size)))


# ---------------------------------------------------------------- one split, two consumers
@pytest.mark.parametrize("mode", ["local_holdout", "dataset_share"])
def test_personalization_and_per_client_score_the_same_examples(tmp_path, mode):
    sc = _digits(**{"personalization.method": "finetune", "eval.per_client": True,
                    "eval.client_test": mode})
    res = fedflat.run(sc, out=tmp_path / mode)
    last = res.metrics[-1]
    rows = [json.loads(ln) for ln in (res.run_dir / "per_client.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] == last["round"]]
    assert [r["client_id"] for r in rows] == list(range(10))
    # Independent evaluation of the saved model on the split, logits by hand.
    fed = _fed(sc)
    ds = fed.dataset
    x_all, y_all = (ds.x_train, ds.y_train) if mode == "local_holdout" else (ds.x_test, ds.y_test)
    w = torch.load(res.run_dir / "final_model.pt")
    d, k = x_all[0].numel(), ds.num_classes
    weight, bias = w[: d * k].reshape(k, d), w[d * k:]
    correct, total, accs = 0, 0, []
    for r, ix in zip(rows, fed.client_test.indices, strict=True):
        x, y = x_all[torch.as_tensor(ix)].reshape(len(ix), -1), y_all[torch.as_tensor(ix)]
        hits = int(((x @ weight.T + bias).argmax(1) == y).sum())
        assert r["n"] == len(y)
        if len(y):
            assert r["accuracy"] == pytest.approx(hits / len(y))
            accs.append(hits / len(y))
        correct, total = correct + hits, total + len(y)
    assert last["personal_test_samples"] == total
    assert last["client_test_accuracy"] == pytest.approx(correct / total)
    assert last["client_test_accuracy_mean"] == pytest.approx(np.mean(accs))
    assert last["per_client/accuracy_mean"] == pytest.approx(np.mean(accs))
    info = json.loads((res.run_dir / "clients.json").read_text())
    assert info["client_test"]["mode"] == mode
    assert info["client_test"]["test_samples"] == [r["n"] for r in rows]


# ---------------------------------------------------------------- bad input
def test_too_small_client_for_a_holdout_is_one_line_before_the_run_folder(tmp_path):
    sc = _digits(**{"data.num_clients": 1000, "data.partition": {"method": "iid"},
                    "eval.client_test": "local_holdout", "server.clients_per_round": 5})
    with pytest.raises(ScenarioError) as info:
        fedflat.run(sc, out=tmp_path / "run")
    msg = str(info.value)
    assert "eval.client_test" in msg
    assert "needs >= 2" in msg
    assert "\n" not in msg
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize(("key", "to"), [("test_fraction", "eval.holdout_fraction"),
                                         ("test_split", "eval.client_test")])
def test_moved_personalization_keys_say_where_they_went(key, to):
    with pytest.raises(ScenarioError, match=to.replace(".", r"\.")):
        load_scenario(_digits(**{"personalization.method": "ditto",
                                 f"personalization.{key}": 0.3}))
