"""FedAvg on Synthetic(1,1) with the FedProx protocol lands in the band of ALGORITHMS.md §9.2.

Reference (independent numpy re-run, 30 devices, MCLR, SGD lr 0.01, b=10, E=20, 10 devices per
round, 200 rounds, weighted averaging): final test accuracy 83.3 % and 86.6 % on two seeds
(mean 84.9 %); seed-to-seed spread is large because every seed draws a new data set.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
from concurrent.futures import ProcessPoolExecutor

import pytest

import fedflat

SEEDS = [0, 1, 2, 3, 4]


def protocol(seed: int) -> dict:
    return {
        "name": "fedprox_synthetic_1_1", "seed": seed,
        "data": {"dataset": "synthetic", "num_clients": 30,
                 "synthetic": {"alpha": 1.0, "beta": 1.0, "prior_scale": "std"}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.01, "batch_size": 10, "local_epochs": 20},
        "server": {"rounds": 200, "clients_per_round": 10, "sampling": "uniform"},
        "runtime": {"backend": "serial", "threads": 1},
        "eval": {"every": 200},
        "output": {"checkpoint_every": 0, "progress": False},
    }


def final_accuracy(seed: int, out: str) -> float:
    return fedflat.run(protocol(seed), out=out).summary["final_test_accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_fedavg_synthetic_1_1_accuracy_band(tmp_path):
    # One seed per process on each core: client sizes are log-normal, so one large client
    # would leave a second Ray actor idle for much of a round (serial == Ray is tested
    # elsewhere). Spawned, not forked: the test session may hold a running Ray.
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        accs = list(pool.map(final_accuracy, SEEDS, [str(tmp_path / f"seed{s}") for s in SEEDS]))
    mean = statistics.mean(accs)
    print(f"FedAvg Synthetic(1,1) final accuracy per seed: {[round(a, 4) for a in accs]}, "
          f"mean {mean:.4f}")
    # §9.2: 83.3 / 86.6 (mean 84.9) on two seeds of the reference generator; every seed draws a
    # new data set (measured here: 78.1, 76.7, 86.4, 71.1, ... %), so the band is that of the
    # spread: a broken aggregation or sampler lands far below it.
    assert 0.74 <= mean <= 0.92
    assert all(0.62 <= a <= 0.97 for a in accs)
