"""Overhead of the sweep runner against running the same runs one after another.

Baseline: the sweep's own ``fedflat run ... --set ... --out ...`` commands, one subprocess
after another (what a researcher would type). Sweep: ``fedflat sweep`` over the same grid and
seeds with ``--jobs 1`` (and, with ``--ray``, the same as Ray tasks). Prints wall and CPU seconds
of each and the ratio sweep / baseline; the difference is the runner's cost (validation of every
point, the index, the tables; plots are off in both).

    PYTHONPATH=$PWD python scripts/bench_sweep.py [--lrs 0.02,0.05] [--seeds 2] [--rounds 5]
        [--jobs 1] [--ray]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedflat.sweep.runner import command_line, plan  # noqa: E402 - after the path
from fedflat.sweep.spec import SweepSpec, parse_seeds  # noqa: E402


def scenario(rounds: int) -> dict:
    return {"name": "bench", "seed": 0,
            "data": {"dataset": "synthetic", "num_clients": 20,
                     "synthetic": {"max_size": 200}},
            "model": {"name": "logistic"},
            "client": {"lr": 0.05, "batch_size": 10, "local_epochs": 1},
            "server": {"rounds": rounds, "clients_per_round": 5},
            "runtime": {"threads": 1}, "eval": {"every": 1},
            "output": {"checkpoint_every": 1, "plots": False}}


def cpu_seconds() -> float:
    """User + system CPU time of every finished child so far (robust to a loaded machine,
    unlike wall time)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="0.02,0.05", help="grid of client.lr")
    ap.add_argument("--seeds", default="2", help="K seeds or a list")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", type=int, default=1, help="the sweep's --jobs")
    ap.add_argument("--ray", action="store_true", help="the sweep dispatches Ray tasks")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        base = Path(tmp) / "base.yaml"
        base.write_text(yaml.safe_dump(scenario(args.rounds)))
        lrs = [float(x) for x in args.lrs.split(",")]
        spec = SweepSpec(scenario=str(base), grid={"client.lr": lrs},
                         seeds=parse_seeds(args.seeds))
        runs = plan(spec, Path(tmp) / "serial")
        t0, c0 = time.perf_counter(), cpu_seconds()
        for r in runs:
            subprocess.run(command_line(spec, r), check=True, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        serial, serial_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        out = Path(tmp) / "sweep"
        cmd = [sys.executable, "-m", "fedflat.cli", "sweep", str(base), "--grid",
               f"client.lr={args.lrs}", "--seeds", args.seeds, "--jobs", str(args.jobs),
               "--out", str(out), "--no-plots", *(["--ray"] if args.ray else [])]
        t0, c0 = time.perf_counter(), cpu_seconds()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        swept, swept_cpu = time.perf_counter() - t0, cpu_seconds() - c0
        shutil.rmtree(out, ignore_errors=True)
    mode = f"sweep --jobs {args.jobs}" + (" --ray" if args.ray else "")
    print(f"{len(runs)} runs x {args.rounds} rounds")
    print(f"one after another: {serial:.2f} s wall, {serial_cpu:.2f} s CPU")
    if args.ray:  # Ray's workers are the raylet's children, not ours: their CPU is not seen
        print(f"{mode}: {swept:.2f} s wall")
        print(f"ratio (sweep / one after another): {swept / serial:.3f} wall")
    else:
        print(f"{mode}: {swept:.2f} s wall, {swept_cpu:.2f} s CPU")
        print(f"ratio (sweep / one after another): {swept / serial:.3f} wall, "
              f"{swept_cpu / serial_cpu:.3f} CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
