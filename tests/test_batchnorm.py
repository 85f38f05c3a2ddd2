"""BatchNorm running statistics are global model state (model.norm: batch, issue 15.1)."""

from __future__ import annotations

import pytest
import torch
from conftest import set_keys

import fedflat
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.scenario.loader import load_scenario


def bn_scenario(**over) -> dict:
    sc = {"name": "bn", "seed": 0,
          "data": {"dataset": "digits", "num_clients": 10, "partition": {"method": "iid"}},
          "model": {"name": "cnn", "norm": "batch"},
          "client": {"lr": 0.05, "batch_size": 32, "local_epochs": 1},
          "server": {"rounds": 15, "clients_per_round": 5},
          "runtime": {"threads": 1}, "eval": {"every": 15},
          "output": {"checkpoint_every": 0, "progress": False, "plots": False}}
    return set_keys(sc, over)


def test_global_statistics_are_the_weighted_mean_of_the_clients(tmp_path):
    # One full-batch step per client: its statistics are one BatchNorm update of the initial
    # ones on all of its data (made in the forward pass, before the step), computed here
    # directly with the torch module; the server must hold their sample-weighted mean.
    sc_dict = bn_scenario(**{"data.num_clients": 2, "server.clients_per_round": 2,
                             "server.rounds": 1, "client.batch_size": 2000,
                             "client.local_epochs": None, "client.local_steps": 1})
    res = fedflat.run(sc_dict, out=tmp_path / "run")
    sc = load_scenario(sc_dict).scenario
    fed = build_data(sc)
    model = build_flat_model(sc, fed.dataset)
    model.load(initial_params(sc, model))
    init = model.get_buffers()
    per_client, sizes = [], []
    for ix in fed.client_indices:
        model.set_buffers(init)
        model.module.train()
        with torch.no_grad():
            model.module(fed.dataset.x_train[torch.as_tensor(ix)])
        per_client.append(model.get_buffers())
        sizes.append(len(ix))
    expected = sum(n * b for n, b in zip(sizes, per_client, strict=True)) / sum(sizes)
    assert res.buffers.numel() == init.numel() > 0
    assert not torch.allclose(res.buffers, init)  # the statistics moved off 0 / 1
    torch.testing.assert_close(res.buffers, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_batchnorm_cnn_reaches_the_accuracy_of_its_weights(tmp_path):
    # Issue 15.1's reproduction: 0.53 here before the fix (statistics stuck at 0 / 1 on the
    # server), 0.97 after; the same weights with re-estimated statistics gave 0.93.
    res = fedflat.run(bn_scenario(), out=tmp_path / "avg")
    assert res.metrics[-1]["test_accuracy"] >= 0.85


@pytest.mark.ray
@pytest.mark.slow
def test_batchnorm_ray_equals_serial(tmp_path, ray_session):
    sc = bn_scenario(**{"server.rounds": 3, "eval.every": 3})
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 2, "threads": 1}},
                         out=tmp_path / "r")
    assert torch.equal(serial.params, on_ray.params)
    assert torch.equal(serial.buffers, on_ray.buffers)


def _rewind(run_dir, to_round: int) -> None:
    """Make a finished run folder look as if it had been killed after ``to_round`` rounds
    (as tests/test_runtime.py does)."""
    for p in (run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > to_round:
            p.unlink()
    (run_dir / "final_model.pt").unlink()


SMALL = {"data.num_clients": 4, "server.clients_per_round": 2, "server.rounds": 3,
         "eval.every": 1, "output.checkpoint_every": 1, "output.keep_checkpoints": 10}


@pytest.mark.parametrize("aggregation", ["average", "local"])
def test_resume_with_batchnorm_equals_uninterrupted(tmp_path, aggregation):
    # The statistics are checkpointed model state: global ones (average) or each client's
    # own (local); a resumed run must continue from them, not from 0 / 1. Training forwards
    # use batch statistics, so the evaluations (running statistics) are what would differ.
    sc = bn_scenario(**{**SMALL, "model.bn_aggregation": aggregation})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    _rewind(again.run_dir, 1)
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    assert torch.equal(resumed.buffers, reference.buffers)
    assert [m.get("test_accuracy") for m in resumed.metrics] == \
        [m.get("test_accuracy") for m in reference.metrics]


def test_flower_server_app_with_batchnorm_equals_serial(tmp_path):
    # The statistics travel in the Flower messages (broadcast down, each client's up):
    # the ServerApp over in-process ClientApps gives the serial run bit for bit.
    pytest.importorskip("flwr")
    from test_flower import LocalGrid, flower_run, nodes_for, same_records

    sc = bn_scenario(**{**SMALL, "output.checkpoint_every": 0})
    serial = fedflat.run(sc, out=tmp_path / "serial")
    res = flower_run(sc, tmp_path / "flower", LocalGrid(nodes_for(4)))
    assert torch.equal(res.params, serial.params)
    assert serial.buffers.numel() > 0
    assert torch.equal(res.buffers, serial.buffers)
    same_records(res.metrics, serial.metrics)
