"""Populations of 10⁶ clients: on-demand synthetic devices, sampled evaluation, the client
store inside runs, and the scale benchmark's smoke mode."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fedflat
from fedflat.data.datasets import sample_devices
from fedflat.data.synthetic import generate_synthetic, synthetic_devices, synthetic_sizes
from fedflat.rng import numpy_rng
from fedflat.runtime.build import build_data
from fedflat.runtime.checkpoint import load_latest
from fedflat.runtime.client_store import ClientStore
from fedflat.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]


def on_demand(n: int, **extra) -> dict:
    sc = {"name": "scale", "seed": 3,
          "data": {"dataset": "synthetic", "num_clients": n,
                   "synthetic": {"on_demand": True, "max_size": 120}},
          "client": {"lr": 0.05, "batch_size": 16, "local_steps": 3},
          "server": {"rounds": 3, "clients_per_round": 10},
          "eval": {"max_samples": 300},
          "output": {"checkpoint_every": 1, "keep_checkpoints": 10, "progress": False,
                     "plots": False}}
    for k, v in extra.items():
        sc[k] = {**sc.get(k, {}), **v}
    return sc


def test_a_device_is_a_function_of_seed_and_id_not_of_the_population():
    small = synthetic_devices(5, 10, alpha=1.0, beta=1.0, max_size=500)
    large = synthetic_devices(5, 1_000_000, alpha=1.0, beta=1.0, max_size=500)
    for k in (0, 3, 9):
        for a, b in zip(small.device(k), large.device(k), strict=True):
            assert np.array_equal(a, b)
    x0, y0, _, _ = small.device(0)
    x1, _, _, _ = small.device(1)
    assert not np.array_equal(x0[:5], x1[:5])
    assert x0.dtype == np.float32
    assert y0.dtype == np.int64
    # the population costs its sizes only: 16 bytes a device, also pickled (what Ray ships)
    assert large.sizes.nbytes + large.train_sizes.nbytes == 16_000_000
    assert len(pickle.dumps(large)) < 17_000_000


def test_sizes_and_splits_are_the_pooled_generators():
    pooled = generate_synthetic(numpy_rng(5, "data"), 40, alpha=0.5, beta=0.5)
    lazy = synthetic_devices(5, 40, alpha=0.5, beta=0.5)
    assert np.array_equal(lazy.sizes, pooled.params.sizes)
    for k in range(40):
        x_tr, y_tr, _x_te, y_te = lazy.device(k)
        assert len(y_tr) == len(pooled.train_groups[k]) == int(0.9 * lazy.sizes[k])
        assert len(y_te) == len(pooled.test_groups[k])
        assert x_tr.shape[1] == 60
        assert y_tr.min() >= 0
        assert y_tr.max() < 10


def test_iid_devices_share_one_labelling_model():
    # Synthetic-IID: one global (W, b) labels every device, so a least-squares fit of the
    # one-hot labels on device 0 predicts device 7's labels better than chance by far.
    lazy = synthetic_devices(1, 8, iid=True, size_mean=7.0, size_sigma=0.0)
    x0, y0, _, _ = lazy.device(0)
    x7, y7, _, _ = lazy.device(7)
    design = np.c_[x0, np.ones(len(x0))]
    coef, *_ = np.linalg.lstsq(design, np.eye(10)[y0], rcond=None)
    acc = (np.argmax(np.c_[x7, np.ones(len(x7))] @ coef, axis=1) == y7).mean()
    assert acc > 0.5


def test_evaluation_sample_has_a_fixed_size_whatever_the_population():
    for n in (30, 200_000):
        devices = synthetic_devices(0, n, max_size=200)
        x, y = sample_devices(devices, "test", 250, numpy_rng(0, "eval", 0, 0))
        assert x.shape == (250, 60)
        assert y.shape == (250,)


def test_million_device_run_keeps_clients_json_small(tmp_path):
    res = fedflat.run(on_demand(1_000_000, server={"rounds": 1},
                                output={"checkpoint_every": 0}), out=tmp_path / "r")
    assert len(res.metrics) == 1
    assert res.metrics[0]["test_accuracy"] is not None
    info = json.loads((res.run_dir / "clients.json").read_text())
    assert info["num_clients"] == 1_000_000
    assert (res.run_dir / "clients.json").stat().st_size < 1000
    sizes = np.load(res.run_dir / info["sizes_file"])
    want = synthetic_sizes(numpy_rng(3, "data"), 1_000_000, max_size=120)
    assert np.array_equal(sizes, np.floor(0.9 * want).astype(np.int64))


def test_on_demand_resumed_equals_uninterrupted_with_scaffold_state(tmp_path):
    sc = on_demand(50, client={"correction": {"scaffold": True}},
                   comm={"uplink": {"codec": "top_k", "k": 50, "error_feedback": True}})
    ref = fedflat.run(sc, out=tmp_path / "ref")
    store = load_latest(ref.run_dir)["server"]["client_states"]
    assert isinstance(store, ClientStore)
    assert len(store) <= 30  # only the clients that trained hold state
    assert all(len(s) >= 2 for s in store.values())
    for p in (ref.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 1:
            p.unlink()
    (ref.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(ref.run_dir)
    assert torch.equal(resumed.params, ref.params)


def test_on_demand_vmap_equals_serial():
    serial = fedflat.run(on_demand(40, output={"checkpoint_every": 0}))
    vmap = fedflat.run(on_demand(40, output={"checkpoint_every": 0},
                                 runtime={"backend": "vmap"}))
    assert (serial.params - vmap.params).abs().max() <= 1e-4


@pytest.mark.slow
def test_on_demand_ray_equals_serial(ray_session):
    # the actors receive the devices (sizes only) and generate the same clients
    sc = on_demand(40, client={"correction": {"scaffold": True}}, output={"checkpoint_every": 0})
    serial = fedflat.run(sc)
    ray = fedflat.run({**sc, "runtime": {"backend": "ray", "num_actors": 1, "num_cpus": 1,
                                         "threads": 1}})
    assert torch.equal(serial.params, ray.params)


def test_on_demand_needs_the_natural_partition(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\ndata:\n  synthetic:\n    on_demand: true\n"
                    "  partition:\n    method: iid\n")
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "run", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bad.yaml" in lines[0]
    assert "data.partition.method" in lines[0]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_on_demand_refuses_per_client_evaluation():
    sc = load_scenario(on_demand(10, eval={"per_client": True})).scenario
    with pytest.raises(fedflat.errors.DataError, match=r"eval\.per_client"):
        build_data(sc)


@pytest.mark.slow
def test_bench_scale_quick_prints_every_backend_and_population():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for name in ("plain", "serial", "vmap"):
        row = next(x for x in lines if x.startswith(name + " "))
        assert row.rstrip().endswith("x")
    pops = [x for x in lines if x.startswith("population")]
    assert len(pops) == 2
    assert all("peak RSS" in x for x in pops)
    assert any(x.startswith("store checkpoint: save") for x in lines)


# ---------------------------------------------------------------- real data at scale
def _pooled(n: int = 30):
    from conftest import tiny_scenario

    sc = load_scenario(tiny_scenario(**{"data.dataset": "digits", "data.num_clients": n,
                                        "data.partition.method": "iid"}))
    return sc.scenario, build_data(sc.scenario)


def test_index_lists_hold_the_lists_and_their_sizes():
    from fedflat.runtime.shared_data import IndexLists

    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 1000, size=int(k)) for k in rng.integers(0, 9, size=200)]
    il = IndexLists.from_lists(lists)
    assert len(il) == 200
    assert [len(ix) for ix in lists] == il.sizes().tolist()
    assert all(np.array_equal(a, b) for a, b in zip(lists, il, strict=True))
    assert np.array_equal(il[-1], lists[-1])
    assert not il[3].flags.writeable  # a view into every client's indices
    with pytest.raises(IndexError):
        il[200]
    with pytest.raises(ValueError, match="offsets"):
        IndexLists(np.arange(5), np.array([0, 3, 2, 5]))


def test_shared_data_round_trips_exactly_through_pickle():
    from fedflat.runtime.shared_data import share, unshare

    _, fed = _pooled()
    back = unshare(pickle.loads(pickle.dumps(share(fed))))
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(back.dataset, k), getattr(fed.dataset, k))
    assert len(back.client_indices) == len(fed.client_indices)
    assert all(np.array_equal(a, b)
               for a, b in zip(back.client_indices, fed.client_indices, strict=True))
    assert np.array_equal(back.client_sizes(), fed.client_sizes())
    assert back.dataset.in_shape == fed.dataset.in_shape


def test_worker_on_index_lists_trains_as_on_the_lists():
    # the lazy gathers (and CSR index lists, as Ray's actors get them) change no number
    from fedflat.runtime.build import build_flat_model, initial_params
    from fedflat.runtime.shared_data import IndexLists, unshare
    from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload

    sc, fed = _pooled()
    csr = unshare(fed)
    csr.client_indices = IndexLists.from_lists(fed.client_indices)
    x0 = initial_params(sc, build_flat_model(sc, fed.dataset))
    jobs = [ClientJob(round=0, client_id=c, lr=0.05) for c in (4, 17, 4, 29)]
    a = ClientWorker(sc, fed, threads=1).run(RoundPayload(0, x0, {}), jobs, [{}] * 4)
    b = ClientWorker(sc, csr, threads=1).run(RoundPayload(0, x0, {}), jobs, [{}] * 4)
    for ra, rb, j in zip(a, b, jobs, strict=True):
        assert torch.equal(ra.delta, rb.delta)
        assert ra.num_samples == rb.num_samples == len(fed.client_indices[j.client_id])


# ---------------------------------------------------------------- on-demand devices elsewhere
def test_secagg_weight_bound_of_on_demand_devices_is_the_largest_device():
    from fedflat.flower.secagg import max_weight

    sc = load_scenario(on_demand(25, server={"aggregation": {"weighting": "samples"}})).scenario
    fed = build_data(sc)
    largest = max(len(fed.source.device(k)[1]) for k in range(25))  # the devices' own data
    assert max_weight(sc, fed) == float(largest)


def test_sample_level_audit_runs_on_on_demand_devices():
    from fedflat.audit.scenario_audit import audit_scenario

    sc = on_demand(20, server={"rounds": 6}, client={"batch_size": 5},
                   privacy={"sample_level": {"enabled": True, "epsilon": 1.0, "delta": 1e-5,
                                             "clip_norm": 1.0}})
    ok = audit_scenario(sc, canaries=1000)
    assert ok.level == "sample"
    assert not ok.flagged
    assert audit_scenario(sc, canaries=1000, fault="noise_off").flagged


@pytest.mark.slow
def test_bench_scale_quick_real_data_paths():
    from conftest import DATA_DIR, data_available

    if not data_available("mnist", "mnist.npz"):
        pytest.skip(f"no MNIST under {DATA_DIR}")
    env = {**dict(__import__("os").environ), "FEDFLAT_DATA": DATA_DIR}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--quick",
                           "--data", "mnist"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [x for x in proc.stdout.splitlines() if x.startswith("population")]
    assert len(rows) == 1
    assert "serial" in rows[0]
    assert "ms/round" in rows[0]
    assert "peak RSS" in rows[0]
    env.pop("FEDFLAT_DATA")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--quick",
                           "--data", "femnist"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0
    assert "skipped: --data femnist needs FEDFLAT_DATA" in proc.stdout


def test_large_population_writes_class_counts_as_a_binary_file(tmp_path, monkeypatch):
    from conftest import tiny_scenario

    from fedflat.data.partition import client_stats
    from fedflat.runtime import shared_data

    monkeypatch.setattr(shared_data, "CLIENT_STATS_JSON_MAX", 10)  # 30 clients count as many
    sc = tiny_scenario(**{"data.dataset": "digits", "data.num_clients": 30,
                          "data.partition.method": "dirichlet_per_client", "server.rounds": 1,
                          "output.checkpoint_every": 0})
    res = fedflat.run(sc, out=tmp_path / "r")
    info = json.loads((res.run_dir / "clients.json").read_text())
    counts = np.load(res.run_dir / info["clients"]["class_counts_file"])
    fed = build_data(load_scenario(sc).scenario)
    want = client_stats(fed.client_indices, fed.dataset.y_train.numpy(), 10)  # per client
    assert counts.shape == (30, 10)
    assert counts.tolist() == [w["class_counts"] for w in want]
    assert counts.sum() == len(fed.dataset.y_train)  # every sample with one client
    assert info["clients"]["num_samples"]["max"] == max(w["num_samples"] for w in want)


@pytest.mark.slow
def test_on_demand_devices_under_flower_equal_serial(tmp_path):
    pytest.importorskip("flwr")
    import yaml

    sc = on_demand(12, server={"rounds": 2, "clients_per_round": 4},
                   output={"checkpoint_every": 0},
                   runtime={"num_actors": 1, "num_cpus": 1, "threads": 1})
    src = tmp_path / "od.yaml"
    src.write_text(yaml.safe_dump(sc))
    # A fresh process: Flower's engine shuts Ray down at its end (the suite shares one Ray).
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "flower", "simulate", str(src),
                           "--out", str(tmp_path / "flower")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=280,
                          env={**os.environ, "PYTHONPATH": str(Path(fedflat.__file__).parents[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    serial = fedflat.run(sc, out=tmp_path / "serial")
    flower = torch.load(tmp_path / "flower" / "final_model.pt")  # each node made its device
    assert torch.equal(serial.params, flower)
