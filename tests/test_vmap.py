"""The vectorised engine (runtime.backend: vmap) against the serial reference.

The independent fact is the serial loop (one client after another through client_update):
the vmap engine must give the same deltas, client states, uplink extras, step counts and
losses, within float tolerance (it sums in another order), on ragged chunks (clients of
different sizes, stragglers' max_steps) and for every oracle, correction and DP mechanism.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import set_keys, tiny_scenario

import fedflat
from fedflat.client.local_corrections import (
    FEDDYN_GRAD,
    PREV_GLOBAL_UPDATE,
    PREV_STEPS_LR,
    SCAFFOLD_C,
    SCAFFOLD_CI,
)
from fedflat.client.oracles import FEDSMOO_MU, FEDSMOO_S
from fedflat.runtime.build import build_data, initial_params
from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload
from fedflat.scenario import load_scenario

TOL = 1e-5  # per-client deltas after one local update (float32, other summation order)


def _workers(over: dict, base: dict | None = None):
    raw = base if base is not None else tiny_scenario()
    raw = set_keys(raw, over)
    serial = load_scenario(raw).scenario
    vm = load_scenario(set_keys(dict(raw), {"runtime.backend": "vmap"})).scenario
    fed = build_data(serial)
    a, b = ClientWorker(serial, fed), ClientWorker(vm, fed)
    assert a.chunks is None
    assert b.chunks is not None
    return serial, fed, a, b


def _round_inputs(sc, fed, worker, *, with_state: bool, max_steps=(None, 2, None, 1, None, 3)):
    gen = torch.Generator().manual_seed(11)
    d = worker.model.num_params
    params = initial_params(sc, worker.model)
    rand = lambda: 0.01 * torch.randn(d, generator=gen)  # noqa: E731
    broadcast = {SCAFFOLD_C: rand(), PREV_GLOBAL_UPDATE: rand(),
                 PREV_STEPS_LR: torch.tensor([0.3]), FEDSMOO_S: rand()}
    sizes = fed.client_sizes()
    ids = [int(i) for i in sizes.argsort()[:: max(1, len(sizes) // 6)][:6]]  # ragged sizes
    jobs = [ClientJob(round=2, client_id=c, lr=0.05 + 0.01 * k, max_steps=m)
            for k, (c, m) in enumerate(zip(ids, max_steps, strict=True))]
    states = []
    for k, _ in enumerate(jobs):
        st = {}
        if with_state and k % 2 == 0:  # half the clients have state, half start from zeros
            st = {SCAFFOLD_CI: rand(), FEDDYN_GRAD: rand(), FEDSMOO_MU: rand()}
        states.append(st)
    return RoundPayload(round=2, params=params, broadcast=broadcast), jobs, states


def _assert_same(ra, rb, tol=TOL):
    assert len(ra) == len(rb)
    for a, b in zip(ra, rb, strict=True):
        assert a.client_id == b.client_id
        assert a.steps == b.steps
        assert a.num_samples == b.num_samples
        assert (a.delta - b.delta).abs().max() <= tol, (a.client_id, a.steps)
        assert sorted(a.client_state) == sorted(b.client_state)
        for k in a.client_state:
            assert (a.client_state[k] - b.client_state[k]).abs().max() <= 20 * tol, k
        assert sorted(a.extras) == sorted(b.extras)
        for k in a.extras:
            assert (a.extras[k] - b.extras[k]).abs().max() <= 20 * tol, k
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4, abs=1e-5, nan_ok=True)
        assert sorted(a.metrics) == sorted(b.metrics)
        for k in a.metrics:
            assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-3, abs=1e-4), k


RULES = {
    "sgd_momentum_wd": {"client.momentum": 0.9, "client.weight_decay": 1e-3},
    "nesterov": {"client.momentum": 0.5, "client.nesterov": True},
    "adam": {"client.optimizer": "adam", "client.lr": 0.01},
    "grad_clip": {"client.grad_clip": 0.5},
    "sam": {"client.oracle": {"name": "sam", "rho": 0.1}, "client.momentum": 0.9},
    "sam_wd_in_perturbation": {"client.oracle": {"name": "sam", "rho": 0.1,
                                                 "wd_in_perturbation": True},
                               "client.weight_decay": 1e-2},
    "asam": {"client.oracle": {"name": "asam", "rho": 0.5, "eta": 0.2}},
    "asam_davda54": {"client.oracle": {"name": "asam", "rho": 0.5, "variant": "davda54"}},
    "gam": {"client.oracle": {"name": "gam"}},
    "fisher_sam": {"client.oracle": {"name": "fisher_sam", "rho": 0.1}},
    "lesam": {"client.oracle": {"name": "lesam", "rho": 0.1}},
    "fedprox": {"client.correction": {"prox_mu": 0.1}},
    "scaffold": {"client.correction": {"scaffold": True}, "client.momentum": 0.5},
    "feddyn": {"client.correction": {"feddyn_alpha": 0.1}},
    "mofedsam": {"client.oracle": {"name": "sam", "rho": 0.05},
                 "client.correction": {"mofedsam_alpha": 0.1}},
    "fedsmoo": {"client.oracle": {"name": "fedsmoo", "rho": 0.1},
                "client.correction": {"feddyn_alpha": 0.1}},
    "label_flip": {"attack": {"kind": "label_flip", "fraction": 0.5}},
    "uplink_error_feedback": {"comm.uplink": {"codec": "top_k", "ratio": 0.1,
                                              "error_feedback": True}},
}


@pytest.mark.parametrize("case", sorted(RULES))
def test_chunk_equals_serial_loop(case):
    """Ragged chunk (6 clients of different sizes, 3 with max_steps, different lrs)."""
    sc, fed, a, b = _workers({"client.local_epochs": 2, **RULES[case]})
    payload, jobs, states = _round_inputs(sc, fed, a, with_state=True)
    assert len({fed.client_sizes()[j.client_id] for j in jobs}) > 3
    _assert_same(a.run(payload, jobs, states), b.run(payload, jobs, states))


DP_CASES = {
    "dp_sgd": {"mechanism": "dp_sgd"},
    "dp_sgd_per_layer": {"mechanism": "dp_sgd", "per_layer_clipping": True},
    "dp_sgd_sampling_rate": {"mechanism": "dp_sgd", "sampling_rate": 0.1},
    "dp_sat": {"mechanism": "dp_sat", "rho": 0.05},
    "dp_sat_momentum": {"mechanism": "dp_sat_momentum", "rho": 0.05},
    "dp_sam": {"mechanism": "dp_sam", "rho": 0.05},
}


@pytest.mark.parametrize("case", sorted(DP_CASES))
def test_dp_chunk_equals_serial_loop(case):
    """Poisson batches (ragged, some empty) and noise from each client's own stream."""
    dp = {"enabled": True, "noise_multiplier": 1.1, "clip_norm": 0.5, **DP_CASES[case]}
    if "sampling_rate" not in dp:
        dp["expected_batch_size"] = 4
    sc, fed, a, b = _workers({"privacy.sample_level": dp, "client.local_steps": 6})
    payload, jobs, states = _round_inputs(sc, fed, a, with_state=False)
    ra, rb = a.run(payload, jobs, states), b.run(payload, jobs, states)
    _assert_same(ra, rb)
    assert any(r.metrics["dp_frac_clipped"] > 0 for r in ra)  # clipping is exercised


def _digits_cnn(**over) -> dict:
    return set_keys({"name": "cnn", "seed": 1,
                 "data": {"dataset": "digits", "num_clients": 12,
                          "partition": {"method": "dirichlet_per_class", "alpha": 0.5,
                                        "min_size": 5}},
                 "model": {"name": "cnn", "channels": [4, 8], "hidden": [16], "norm": "group",
                           "groups": 2},
                 "client": {"lr": 0.05, "batch_size": 16, "local_steps": 3},
                 "server": {"rounds": 2, "clients_per_round": 4}, "runtime": {"threads": 1},
                 "output": {"checkpoint_every": 0, "progress": False, "plots": False}}, over)


@pytest.mark.parametrize("over", [
    {"client.oracle": {"name": "sam_on", "rho": 0.5}},
    {"client.oracle": {"name": "sam_on", "rho": 0.5, "adaptive": True, "eta": 0.1}},
    {"privacy.sample_level": {"enabled": True, "noise_multiplier": 1.0, "clip_norm": 1.0,
                              "expected_batch_size": 8}},
], ids=["sam_on", "asam_on", "dp_sgd"])
def test_groupnorm_cnn_chunk_equals_serial_loop(over):
    sc, fed, a, b = _workers(over, _digits_cnn())
    payload, jobs, states = _round_inputs(sc, fed, a, with_state=False)
    _assert_same(a.run(payload, jobs, states), b.run(payload, jobs, states), tol=1e-4)


def test_zero_steps_and_empty_chunk():
    """A client with max_steps 0 returns a zero delta and no loss; an empty chunk is empty."""
    sc, fed, a, b = _workers({"client.correction": {"scaffold": True}})
    payload, jobs, states = _round_inputs(sc, fed, a, with_state=True,
                                          max_steps=(0, 1, None, 0, 2, None))
    ra, rb = a.run(payload, jobs, states), b.run(payload, jobs, states)
    _assert_same(ra, rb)
    assert rb[0].steps == 0
    assert torch.count_nonzero(rb[0].delta) == 0
    assert b.run(payload, [], []) == []


# ------------------------------------------------------------------ end to end, 3 rounds
def _quickstart(**over) -> dict:
    """scenarios/quickstart.yaml made small: Synthetic(1,1), logistic, ragged devices."""
    base = {"name": "quickstart", "seed": 0,
            "data": {"dataset": "synthetic", "num_clients": 30,
                     "synthetic": {"alpha": 1.0, "beta": 1.0, "max_size": 300}},
            "model": {"name": "logistic"},
            "client": {"optimizer": "sgd", "lr": 0.01, "batch_size": 10, "local_epochs": 2},
            "server": {"rounds": 3, "clients_per_round": 10},
            "runtime": {"threads": 1}, "eval": {"every": 3},
            "output": {"checkpoint_every": 0, "progress": False, "plots": False}}
    return set_keys(base, over)


RUNS = {
    "fedavg_momentum_wd": {"client.momentum": 0.9, "client.weight_decay": 1e-3},
    "sam": {"client.oracle": {"name": "sam", "rho": 0.05}},
    "fedprox": {"client.correction": {"prox_mu": 0.1}},
    "scaffold": {"client.correction": {"scaffold": True}},
    "dp_sgd": {"privacy.sample_level": {"enabled": True, "noise_multiplier": 1.0,
                                        "clip_norm": 1.0, "expected_batch_size": 10}},
    # stragglers keep partial work: jobs carry max_steps
    "stragglers": {"system": {"straggler_fraction": 0.5, "straggler_policy": "partial"}},
}


@pytest.mark.parametrize("case", sorted(RUNS))
def test_run_equals_serial_after_three_rounds(tmp_path, case):
    sc = _quickstart(**RUNS[case])
    serial = fedflat.run(sc, out=tmp_path / "s")
    vm = fedflat.run(set_keys(sc, {"runtime.backend": "vmap"}), out=tmp_path / "v")
    assert (serial.params - vm.params).abs().max() <= 1e-4
    assert [m["clients"] for m in serial.metrics] == [m["clients"] for m in vm.metrics]
    assert vm.summary["status"] == "completed"


@pytest.mark.ray
@pytest.mark.slow
def test_ray_actors_running_vmap_equal_serial(tmp_path, ray_session):
    sc = _quickstart(**RUNS["scaffold"])
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run(set_keys(sc, {"runtime": {"backend": "ray", "num_actors": 2, "threads": 1,
                                               "vectorize": True}}), out=tmp_path / "r")
    assert (serial.params - on_ray.params).abs().max() <= 1e-4


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(("over", "key"), [
    ({"model.name": "cnn", "model.norm": "batch", "data.dataset": "digits",
      "data.partition": {"method": "iid"}}, "model.norm"),
    ({"runtime.vectorize": True}, "runtime.vectorize"),
])
def test_unsupported_settings_are_refused_by_name(tmp_path, over, key):
    backend = "serial" if key == "runtime.vectorize" else "vmap"
    sc = _quickstart(**{"runtime.backend": backend, **over})
    with pytest.raises(fedflat.errors.ScenarioError, match=key):
        load_scenario(sc)


def test_refusal_on_the_command_line_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bn.yaml"
    path.write_text(textwrap.dedent("""\
        data: {dataset: digits, num_clients: 20, partition: {method: iid}}
        model: {name: cnn, norm: batch}
        runtime:
          backend: vmap
        """))
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "run", str(path),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "model.norm" in lines[0]
    assert "runtime.backend: vmap" in lines[0]
    assert not (tmp_path / "run").exists()
