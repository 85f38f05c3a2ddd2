"""The one round loop over any transport (protocol conformance).

A transport only maps the client update over the round's jobs; the round (begin_round,
client states, end_round) is ``run_round``'s. So any transport that returns the worker's
results in job order gives the serial model bit for bit, a dropped job leaves exactly its
client out, and a secure mean in place of the deltas gives what the mean rule gives.
"""

from __future__ import annotations

import torch
from conftest import tiny_scenario

import fedflat
from fedflat.runtime.driver import Runner, load_data, new_run_dir
from fedflat.runtime.round_loop import LocalBackend, Mapped
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.worker import ClientWorker
from fedflat.scenario import load_scenario

TIMING_KEYS = {"round_seconds", "wall_seconds"}


class OneByOneTransport:
    """In memory: the worker trains each job on its own, last job first; results come
    back in job order."""

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker
        self.calls = 0

    def map_clients(self, payload, jobs, states):
        self.calls += 1
        out = [None] * len(jobs)
        for i in reversed(range(len(jobs))):
            [out[i]] = self.worker.run(payload, [jobs[i]], [states[i]])
        return Mapped(out)


class DropFirstTransport(OneByOneTransport):
    """Loses the first job of every round (as Ray's ``on_actor_failure: drop`` does)."""

    def map_clients(self, payload, jobs, states):
        mapped = super().map_clients(payload, jobs, states)
        if jobs:
            mapped.results[0] = None
            mapped.record["lost"] = [jobs[0].client_id]
        return mapped


class SecureMeanTransport(OneByOneTransport):
    """Returns only the sample-weighted mean of the deltas, as SecAgg+ does."""

    def map_clients(self, payload, jobs, states):
        mapped = super().map_clients(payload, jobs, states)
        w = torch.tensor([float(r.num_samples) for r in mapped.results], dtype=torch.float64)
        d = torch.stack([r.delta for r in mapped.results]).to(torch.float64)
        mean = ((w / w.sum()) @ d).to(torch.float32)
        for r in mapped.results:
            r.delta = torch.full_like(r.delta, float("nan"))  # must not be used
        return Mapped(mapped.results, {"secure": True}, secure_mean=mean)


def _run(sc: dict, out, transport_cls):
    loaded = load_scenario(sc)
    runner = Runner(loaded, new_run_dir(loaded.scenario, out), load_data(loaded))
    runner.write_static_files()
    made = []

    def factory(s, fed, params0):
        made.append(transport_cls(ClientWorker(s, fed, threads=1)))
        return LocalBackend(ServerCore(s, fed, params0), made[0])

    return runner.execute(make_backend=factory), made[0]


def _same_records(a, b):
    assert [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in a] == \
        [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in b]


def test_in_memory_transport_equals_serial(tmp_path):
    # error feedback: per-client state goes out and comes back through the loop
    sc = tiny_scenario(**{"output.plots": False, "comm.uplink": {
        "codec": "top_k", "ratio": 0.2, "error_feedback": True}})
    serial = fedflat.run(sc, out=tmp_path / "s")
    fake, transport = _run(sc, tmp_path / "f", OneByOneTransport)
    assert torch.equal(fake.params, serial.params)
    _same_records(fake.metrics, serial.metrics)
    assert transport.calls == sc["server"]["rounds"]


def test_dropped_job_leaves_exactly_its_client_out(tmp_path):
    sc = tiny_scenario(**{"output.plots": False})
    serial = fedflat.run(sc, out=tmp_path / "s")
    res, _ = _run(sc, tmp_path / "d", DropFirstTransport)
    for dropped, full in zip(res.metrics, serial.metrics, strict=True):
        # the cohort is the Runner's (unchanged); the record lists the clients aggregated
        assert dropped["lost"] == full["clients"][:1]
        assert dropped["clients"] == full["clients"][1:]
    assert not torch.equal(res.params, serial.params)


def test_secure_mean_replaces_the_deltas(tmp_path):
    # rule mean with the FedAvg server step: the model moves by the (secure) mean
    sc = tiny_scenario(**{"output.plots": False})
    serial = fedflat.run(sc, out=tmp_path / "s")
    res, _ = _run(sc, tmp_path / "m", SecureMeanTransport)
    assert torch.allclose(res.params, serial.params, rtol=0, atol=1e-6)
    assert all(m["secure"] for m in res.metrics)
    assert [m["clients"] for m in res.metrics] == [m["clients"] for m in serial.metrics]
