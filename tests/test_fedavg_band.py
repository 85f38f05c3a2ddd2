"""FedAvg on Synthetic(1,1) with the FedProx protocol (ALGORITHMS.md §6.5, §9.2).

The suite runs one short seed against an independent NumPy FedAvg written here (same data,
same initial model, same cohorts; its own batch order), so a broken client loop, aggregation or
evaluation shows as a gap. The full five-seed band of §9.2 (200 rounds each, ~10 minutes on two
cores) lives in ``scripts/fedavg_band.py``; the README quotes its output.
"""

from __future__ import annotations

import numpy as np
import pytest

import fedflat
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.scenario.loader import load_scenario


def protocol(seed: int, rounds: int) -> dict:
    return {
        "name": "fedprox_synthetic_1_1", "seed": seed,
        "data": {"dataset": "synthetic", "num_clients": 30,
                 "synthetic": {"alpha": 1.0, "beta": 1.0, "prior_scale": "std"}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.01, "batch_size": 10, "local_epochs": 20},
        "server": {"rounds": rounds, "clients_per_round": 10, "sampling": "uniform"},
        "runtime": {"backend": "serial", "threads": 1},
        "eval": {"every": rounds},
        "output": {"checkpoint_every": 0, "progress": False, "plots": False},
    }


def numpy_fedavg(x, y, clients, cohorts, w0, b0, x_test, y_test, *, lr, batch, epochs, seed):
    """Plain FedAvg for multinomial logistic regression (softmax cross-entropy, mean over the
    batch), weighted by client sample counts; returns the final test accuracy."""
    rng = np.random.default_rng(seed)
    w, b = w0.astype(np.float64), b0.astype(np.float64)
    for cohort in cohorts:
        dw, db, total = np.zeros_like(w), np.zeros_like(b), 0
        for c in cohort:
            xc, yc = x[clients[c]], y[clients[c]]
            lw, lb = w.copy(), b.copy()
            for _ in range(epochs):
                perm = rng.permutation(len(yc))
                for i in range(0, len(yc), batch):
                    xb, yb = xc[perm[i:i + batch]], yc[perm[i:i + batch]]
                    z = xb @ lw.T + lb
                    p = np.exp(z - z.max(1, keepdims=True))
                    p /= p.sum(1, keepdims=True)
                    p[np.arange(len(yb)), yb] -= 1.0
                    lw -= lr * (p.T @ xb) / len(yb)
                    lb -= lr * p.sum(0) / len(yb)
            dw += len(yc) * (lw - w)
            db += len(yc) * (lb - b)
            total += len(yc)
        w, b = w + dw / total, b + db / total
    return float(np.mean(np.argmax(x_test @ w.T + b, 1) == y_test))


@pytest.mark.slow
def test_fedavg_matches_independent_numpy_fedavg(tmp_path):
    sc_dict = protocol(seed=0, rounds=15)
    res = fedflat.run(sc_dict, out=tmp_path / "run")
    sc = load_scenario(sc_dict).scenario
    fed = build_data(sc)
    model = build_flat_model(sc, fed.dataset)
    params = initial_params(sc, model)
    named = model.unflatten(params)
    weight, bias = (t.detach().numpy().astype(np.float64) for t in named.values())
    ds = fed.dataset
    cohorts = [m["clients"] for m in res.metrics]
    ref = numpy_fedavg(ds.x_train.double().numpy(), ds.y_train.numpy(), fed.client_indices,
                       cohorts, weight, bias, ds.x_test.double().numpy(), ds.y_test.numpy(),
                       lr=0.01, batch=10, epochs=20, seed=0)
    ours = res.summary["final_test_accuracy"]
    print(f"fedflat {ours:.4f} vs numpy reference {ref:.4f}")
    # Only the batch order differs: measured gaps are within two points.
    assert abs(ours - ref) <= 0.04
    assert ours > 0.5  # far above chance (10 classes): training happened
