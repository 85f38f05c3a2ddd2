"""Overhead of `fedflat flower simulate` against fedflat's own Ray backend.

Workload: scenarios/quickstart.yaml (FedAvg, logistic regression, Synthetic(1,1), 100 clients,
10 per round, 5 local epochs) with fewer rounds (default 10). Both run in a fresh process,
both on 2 workers of 1 CPU each: fedflat's Ray backend (2 client actors) and Flower's
simulation engine (100 virtual SuperNodes, client_resources 1 CPU, Ray with 2 CPUs).
Prints, for each, the end-to-end wall time of the process, the start-up through round 0
(imports, data, Ray, actors, the workers' first build; for Flower also its node discovery:
end to end minus rounds 1..T), the steady-state round time (median of rounds 3..T) and
their ratios to Ray, and checks that both end with the same model.

    python scripts/bench_flower.py [--rounds 10] [--scenario scenarios/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], run_dir: Path) -> tuple[float, list[float], torch.Tensor]:
    """Run a fedflat command in a fresh process; wall time, round times, final model."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", *cmd, "--out", str(run_dir)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    # the first line evaluates the initial model (round -1), no round time
    rounds = [m["round_seconds"] for m in map(json.loads, lines) if m["round"] >= 0]
    return wall, rounds, torch.load(run_dir / "final_model.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--scenario", default=str(REPO / "scenarios" / "quickstart.yaml"))
    args = ap.parse_args()
    if args.rounds < 4:
        raise SystemExit(f"--rounds must be >= 4 (steady state = rounds 3..T), got {args.rounds}")
    common = ["--set", f"server.rounds={args.rounds}", "--set", "runtime.num_actors=2",
              "--set", "runtime.num_cpus=1", "--set", "runtime.threads=1",
              "--set", "output.checkpoint_every=0", "--set", "output.progress=false",
              "--set", f"eval.every={args.rounds}"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("fedflat ray, 2 actors", *timed(["run", args.scenario, "--set", "runtime.backend=ray",
                                              *common], Path(tmp) / "ray")),
            ("flower simulate, 2 workers", *timed(["flower", "simulate", args.scenario, *common],
                                                   Path(tmp) / "flower")),
        ]
    base = rows[0]
    print(f"{args.scenario}, {args.rounds} rounds; ratios relative to fedflat's Ray backend")
    heads = ("end to end", "start-up + round 0", "round (steady)")
    print(f"{'':28} " + " ".join(f"{h:>17}" for h in heads))
    for name, wall, rounds, _ in rows:
        cols = [(wall, base[1]), (wall - sum(rounds[1:]), base[1] - sum(base[2][1:])),
                (statistics.median(rounds[2:]), statistics.median(base[2][2:]))]
        print(f"{name:28} " + " ".join(f"{v:8.2f} s {v / b:5.2f}x" for v, b in cols))
    diff = float((rows[1][3] - base[3]).abs().max())
    print(f"same final model: max |flower - ray| = {diff:.2e}")


if __name__ == "__main__":
    main()
