"""Overhead of fedflat against a plain PyTorch FedAvg loop on the same workload.

Workload (issue 2): 100 clients, 10 per round, 20 rounds, 200 samples per client, MLP 60-200-20,
batch 32, SGD lr 0.05, one local epoch. The same data, cohorts and initial model are used by
all three: a plain PyTorch loop, fedflat `serial`, fedflat `ray` with 2 actors (1 CPU each).
Prints each time and its ratio to the plain loop, end to end and per round in steady state
(median of rounds 5..20), each backend measured --repeats times, interleaved; ratios are taken
within a repeat. Usage: python scripts/bench_overhead.py [--rounds 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

import fedflat
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.runtime.sampling import sample_cohort
from fedflat.scenario import load_scenario


def scenario(rounds: int, backend: str) -> dict:
    return {
        "name": "bench_overhead", "seed": 0,
        "data": {"dataset": "synthetic", "num_clients": 100,
                 # sizes: floor(exp(log 150)) + 50 = 200 samples on every client
                 "synthetic": {"num_classes": 20, "size_mean": math.log(150.5), "size_sigma": 0.0,
                               "min_size": 50, "test_fraction": 0.1}},
        "model": {"name": "mlp", "hidden": [200]},
        "client": {"lr": 0.05, "batch_size": 32, "local_epochs": 1},
        "server": {"rounds": rounds, "clients_per_round": 10},
        "runtime": {"backend": backend, "num_actors": 2, "num_cpus": 1, "threads": 1},
        "eval": {"every": rounds},
        # No end-of-run plots: matplotlib's import and drawing (~1 s) is not training work.
        "output": {"checkpoint_every": 0, "progress": False, "plots": False},
    }


def plain_loop(rounds: int) -> tuple[float, list[float]]:
    """A straightforward PyTorch FedAvg loop (what a researcher would write by hand)."""
    t0 = time.perf_counter()
    sc = load_scenario(scenario(rounds, "serial")).scenario
    fed = build_data(sc)
    x, y = fed.dataset.x_train, fed.dataset.y_train
    model = nn.Sequential(nn.Flatten(), nn.Linear(60, 200), nn.ReLU(), nn.Linear(200, 20))
    glob = initial_params(sc, build_flat_model(sc, fed.dataset))
    per_round = []
    for t in range(rounds):
        r0 = time.perf_counter()
        cohort = sample_cohort(sc.seed, t, 100, method="uniform", clients_per_round=10)
        acc = torch.zeros_like(glob)
        total = 0
        for c in cohort:
            idx = torch.as_tensor(fed.client_indices[c])
            xc, yc = x[idx], y[idx]
            torch.nn.utils.vector_to_parameters(glob, model.parameters())
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            perm = torch.randperm(len(yc))
            for i in range(0, len(yc), 32):
                b = perm[i:i + 32]
                opt.zero_grad()
                nn.functional.cross_entropy(model(xc[b]), yc[b]).backward()
                opt.step()
            acc += len(yc) * (torch.nn.utils.parameters_to_vector(model.parameters()) - glob)
            total += len(yc)
        glob = glob + acc / total
        per_round.append(time.perf_counter() - r0)
    return time.perf_counter() - t0, per_round


def fedflat_run(rounds: int, backend: str) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = fedflat.run(scenario(rounds, backend), out=f"{tmp}/run")
    return time.perf_counter() - t0, [m["round_seconds"] for m in res.metrics]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3,
                    help="measure every backend this many times, interleaved (noisy machines)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    plain_loop(2)  # warm up imports and kernels so that neither side pays them in the timing
    names = ["plain PyTorch loop", "fedflat serial", "fedflat ray, 2 actors"]
    runs = [lambda: plain_loop(args.rounds), lambda: fedflat_run(args.rounds, "serial"),
            lambda: fedflat_run(args.rounds, "ray")]
    # Each repeat measures all three back to back and gives ratios to its own plain loop, so
    # that a slow spell of a shared machine shifts a whole repeat, not one side of a ratio.
    totals: dict[str, list[float]] = {n: [] for n in names}
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name, run in zip(names, runs, strict=True):
            total, per_round = run()
            totals[name].append(total)
            rounds[name].append(statistics.median(per_round[4:]))
    print(f"{'':24} {'end to end':>12} {'ratio':>7} {'round (steady)':>15} {'ratio':>7}"
          f"   (median of {args.repeats} interleaved repeats; ratio range)")
    base_t, base_r = totals[names[0]], rounds[names[0]]
    for name in names:
        rt = [a / b for a, b in zip(totals[name], base_t, strict=True)]
        rr = [a / b for a, b in zip(rounds[name], base_r, strict=True)]
        print(f"{name:24} {statistics.median(totals[name]):10.2f} s {statistics.median(rt):6.2f}x "
              f"{statistics.median(rounds[name]) * 1e3:12.1f} ms {statistics.median(rr):6.2f}x"
              f"   [{min(rr):.2f}-{max(rr):.2f}]")
    print("targets: serial end to end <= 1.1x; ray steady-state round <= 1.0x")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
