"""Personalization: updates against closed forms on a quadratic, per-client splits,
invariants of the runs (APFL with α = 0 is the global model), direction, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedflat
from fedflat.data.client_test import local_holdout
from fedflat.errors import ScenarioError
from fedflat.personalization.methods import (
    apfl_model,
    apfl_update,
    ditto_update,
    sgd_steps,
)
from fedflat.rng import stream
from fedflat.scenario.loader import load_scenario

C = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


class Quadratic:
    """F(z) = ½‖z − c‖² whatever the batch: ∇F = z − c."""

    def loss_grad(self, w, x, y):
        return 0.5 * (w - C).square().sum(), w - C


X, Y = torch.zeros(8, 1), torch.zeros(8, dtype=torch.long)


def _gen():
    return stream(0, "eval", 7)


def test_local_holdout_disjoint_and_sized():
    ix = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 33)]
    train, test = local_holdout(ix, 0.2, seed=3)
    for a, tr, te in zip(ix, train, test, strict=True):
        assert len(te) == max(1, int(np.ceil(0.2 * len(a))))
        assert not set(tr) & set(te)
        assert sorted([*tr, *te]) == list(a)
    again, _ = local_holdout(ix, 0.2, seed=3)
    assert all((a == b).all() for a, b in zip(train, again, strict=True))
    other, _ = local_holdout(ix, 0.2, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(train, other, strict=True))
    with pytest.raises(ValueError, match="client 1"):
        local_holdout([np.arange(5), np.arange(1)], 0.2, seed=0)


def test_finetune_is_gradient_descent_closed_form():
    w = torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64)
    lr, k = 0.1, 7
    p = sgd_steps(Quadratic(), w, X, Y, lr=lr, steps=k, batch_size=4, gen=_gen())
    assert torch.allclose(p, C + (1 - lr) ** k * (w - C), atol=1e-12)


def test_ditto_step_by_hand_and_fixed_point():
    w = torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    lam, lr = 0.5, 0.1
    one = ditto_update(Quadratic(), v, w, X, Y, lam=lam, lr=lr, steps=1, batch_size=4,
                       gen=_gen())
    assert torch.allclose(one, v - lr * ((v - C) + lam * (v - w)), atol=1e-12)
    # Minimiser of ½‖v − c‖² + λ/2 ‖v − w‖²: v* = (c + λ w) / (1 + λ).
    far = ditto_update(Quadratic(), v, w, X, Y, lam=lam, lr=lr, steps=400, batch_size=4,
                       gen=_gen())
    assert torch.allclose(far, (C + lam * w) / (1 + lam), atol=1e-10)


def test_apfl_step_by_hand():
    w = torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64)
    v = torch.tensor([1.5, -1.0, 0.0], dtype=torch.float64)  # closer to c than w
    alpha, lr, alpha_lr = 0.3, 0.1, 0.05
    v1, a1 = apfl_update(Quadratic(), v, alpha, w, X, Y, lr=lr, alpha_lr=alpha_lr, steps=1,
                         batch_size=4, gen=_gen())
    mixed = alpha * v + (1 - alpha) * w
    g = mixed - C
    assert torch.allclose(v1, v - lr * alpha * g, atol=1e-12)
    assert a1 == pytest.approx(alpha - alpha_lr * float(torch.dot(v - w, g)))
    assert a1 > alpha  # the personal model is better here, so α grows
    # α is kept in [0, 1]; with a zero step size it stays put.
    _, a_big = apfl_update(Quadratic(), v, 0.9, w, X, Y, lr=lr, alpha_lr=10.0, steps=3,
                           batch_size=4, gen=_gen())
    assert a_big == 1.0
    v0, a0 = apfl_update(Quadratic(), v, 0.0, w, X, Y, lr=lr, alpha_lr=0.0, steps=5,
                         batch_size=4, gen=_gen())
    assert a0 == 0.0
    assert torch.equal(v0, v)
    assert torch.allclose(apfl_model(v, 0.25, w), 0.25 * v + 0.75 * w)


# ------------------------------------------------------------------------- runs
def _scenario(method: str, partition: dict | None = None, **pz) -> dict:
    return {
        "name": "pz", "seed": 1,
        "data": {"dataset": "digits", "num_clients": 10,
                 "partition": partition or {"method": "shards", "shards_per_client": 2}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 16, "local_steps": 5},
        "server": {"rounds": 4, "clients_per_round": 5},
        "runtime": {"threads": 1}, "eval": {"every": 2},
        "output": {"checkpoint_every": 1, "plots": False, "progress": False,
                   "keep_checkpoints": 10},
        "personalization": {"method": method, **pz},
    }


def test_apfl_with_alpha_zero_is_the_global_model(tmp_path):
    res = fedflat.run(_scenario("apfl", apfl_alpha=0.0, apfl_alpha_lr=0.0), out=tmp_path / "a")
    for m in (r for r in res.metrics if "personal_test_accuracy" in r):
        assert m["personal_test_accuracy"] == m["client_test_accuracy"]
        assert m["apfl_alpha_mean"] == 0.0
    # Training the global model is untouched by personalization.
    plain = fedflat.run(_scenario("finetune"), out=tmp_path / "b")
    assert torch.equal(res.params, plain.params)


def test_finetune_beats_global_on_pathological_split(tmp_path):
    res = fedflat.run(_scenario("finetune", finetune_steps=10), out=tmp_path / "f")
    last = res.metrics[-1]
    assert last["personal_test_accuracy"] > last["client_test_accuracy"] + 0.05
    assert last["personal_gain"] == pytest.approx(
        last["personal_test_accuracy"] - last["client_test_accuracy"])


def test_ditto_resumes_exactly(tmp_path):
    sc = _scenario("ditto", ditto_lambda=0.5)
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    for p in (again.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 2:
            p.unlink()
    (again.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    assert [m.get("personal_test_accuracy") for m in resumed.metrics] == \
        [m.get("personal_test_accuracy") for m in reference.metrics]


@pytest.mark.parametrize(("over", "key"), [
    ({"runtime": {"backend": "ray"}}, "runtime.backend"),
    ({"privacy": {"sample_level": {"enabled": True, "noise_multiplier": 1.0}}}, "privacy"),
    ({"topology": {"kind": "ring"}}, "topology.kind"),
])
def test_personalization_refusals(over, key):
    sc = {**_scenario("ditto"), **over}
    with pytest.raises(ScenarioError) as info:
        load_scenario(sc)
    assert key in str(info.value)


@pytest.mark.slow
def test_reproduce_personalization_quick_table(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_personalization.py"
    spec = importlib.util.spec_from_file_location("reproduce_personalization", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "table.md"
    mod.main(["--quick", "--rounds", "2", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines()
            if line.startswith(("| pathological", "| iid"))]
    assert len(rows) == 8
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        glob, pers, gain = float(cells[3]), float(cells[4]), float(cells[5])
        assert gain == pytest.approx(pers - glob, abs=0.11)  # rounded to 0.1 point
    apfl = [r for r in rows if "APFL" in r]
    assert all(0 <= float(r.split("|")[6]) <= 1 for r in apfl)


def test_natural_datasets_use_their_own_client_test_split(tmp_path):
    from conftest import tiny_scenario

    from fedflat.runtime.build import build_data

    sc = tiny_scenario(**{"personalization.method": "finetune", "server.rounds": 2})
    res = fedflat.run(sc, out=tmp_path / "nat")
    fed = build_data(load_scenario(sc).scenario)
    n_test = sum(len(g) for g in fed.dataset.test_groups[: fed.num_clients])
    assert res.metrics[-1]["personal_test_samples"] == n_test
    # Nothing held out: the clients train on all their training data.
    clients = json.loads((res.run_dir / "clients.json").read_text())["clients"]
    assert [c["num_samples"] for c in clients] == [len(ix) for ix in fed.client_indices]
    held = fedflat.run({**sc, "eval": {**sc["eval"], "client_test": "local_holdout"}},
                       out=tmp_path / "hold")
    sizes = [len(ix) for ix in fed.client_indices]
    assert held.metrics[-1]["personal_test_samples"] == sum(
        max(1, int(np.ceil(0.2 * n))) for n in sizes)
