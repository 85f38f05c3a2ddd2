"""Scale benchmark (issue 10): backends side by side, populations of 10³-10⁶ devices, and
the checkpoint of a large per-client state store.

1. The workload of scripts/bench_overhead.py (100 clients, 10 per round, MLP 60-200-20, one
   local epoch of 200 samples) for the plain PyTorch loop, fedflat ``serial``, ``ray`` (2
   actors), ``vmap`` and Ray actors running vmap (``runtime.vectorize``): seconds per round in
   steady state (median of rounds 5..) and the ratio to the plain loop, one line per backend.
2. Populations of 10³, 10⁴, 10⁵, 10⁶ synthetic devices generated on demand
   (``data.synthetic.on_demand``), 100 per round, logistic model, 5 local steps, evaluation
   on a fixed sample (``eval.max_samples``): seconds per round, start-up, peak RSS. Each
   population runs in its own subprocess so that the peaks are separate.
3. A ClientStore of 10⁵ clients × 610 floats (the logistic model's size, e.g. SCAFFOLD's c_i or
   an error-feedback residual) written and read with the run's checkpoint functions.

Usage: python scripts/bench_scale.py [--quick] [--rounds 20] [--pop-rounds 6]
  [--pop-backend serial|ray|vmap] [--backends serial,ray,vmap,ray+vmap|none]
  [--populations 1000,10000,100000,1000000|none] [--store-clients 100000|0]
  (peak RSS is the driver process's: with ray it leaves out the actors' own processes)
  --quick: a smoke run (< 60 s): plain/serial/vmap only, populations 10³ and 10⁴, store 10⁴.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _overhead_module():
    spec = importlib.util.spec_from_file_location("bench_overhead", HERE / "bench_overhead.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# ------------------------------------------------------------------ 1. backends
def backends(rounds: int, names: list[str]) -> None:
    import fedflat

    bo = _overhead_module()

    def steady(per_round: list[float]) -> float:
        return statistics.median(per_round[4:] or per_round)

    def fedflat_round(extra: dict) -> float:
        sc = bo.scenario(rounds, extra.get("backend", "serial"))
        sc["runtime"].update(extra)
        with tempfile.TemporaryDirectory() as tmp:
            res = fedflat.run(sc, out=f"{tmp}/run")
        return steady([m["round_seconds"] for m in res.metrics])

    runs = {
        "plain": lambda: steady(bo.plain_loop(rounds)[1]),
        "serial": lambda: fedflat_round({"backend": "serial"}),
        "ray": lambda: fedflat_round({"backend": "ray"}),
        "vmap": lambda: fedflat_round({"backend": "vmap"}),
        "ray+vmap": lambda: fedflat_round({"backend": "ray", "vectorize": True}),
    }
    torch.set_num_threads(1)
    bo.plain_loop(2)  # warm up imports and kernels
    print(f"# backends: bench_overhead workload, {rounds} rounds, steady-state round "
          "(median of rounds 5..)")
    base = None
    for name in ["plain", *[n for n in names if n != "plain"]]:
        sec = runs[name]()
        base = sec if base is None else base
        print(f"{name:10} {sec * 1e3:9.1f} ms/round {sec / base:6.2f}x", flush=True)


# ------------------------------------------------------------------ 2. populations
def population_scenario(n: int, rounds: int, backend: str) -> dict:
    return {
        "name": "bench_scale", "seed": 0,
        "data": {"dataset": "synthetic", "num_clients": n,
                 # capped sizes: a 10⁶-device heavy tail would otherwise hold single devices
                 # of 10⁵+ samples, and the comparison across populations is about N
                 "synthetic": {"on_demand": True, "max_size": 1000}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 32, "local_steps": 5},
        "server": {"rounds": rounds, "clients_per_round": 100},
        "runtime": {"backend": backend, "num_actors": 2, "num_cpus": 1, "threads": 1},
        "eval": {"every": 1, "max_samples": 2000},
        "output": {"checkpoint_every": 0, "progress": False, "plots": False},
    }


def population_child(n: int, rounds: int, backend: str) -> None:
    """Runs in a subprocess: one population, prints one JSON line."""
    import fedflat

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = fedflat.run(population_scenario(n, rounds, backend), out=f"{tmp}/run")
        clients_json = os.path.getsize(f"{tmp}/run/clients.json")
    total = time.perf_counter() - t0
    per_round = [m["round_seconds"] for m in res.metrics]
    steady = per_round[1:] or per_round
    print(json.dumps({"n": n, "round_s": statistics.median(steady),
                      "start_s": total - sum(per_round),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "clients_json_bytes": clients_json}))


def populations(sizes: list[int], rounds: int, backend: str) -> None:
    print(f"# populations: on-demand synthetic devices, 100 per round, logistic, 5 local steps, "
          f"eval on 2000 samples every round, {rounds} rounds, backend {backend}, "
          "one subprocess each")
    base = None
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--population", str(n), "--pop-rounds",
                              str(rounds), "--pop-backend", backend],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"population {n:>9,}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = r if base is None else base
        print(f"population {n:>9,}: {r['round_s'] * 1e3:8.1f} ms/round "
              f"{r['round_s'] / base['round_s']:5.2f}x   peak RSS {r['rss_mb']:7.0f} MB "
              f"{r['rss_mb'] / base['rss_mb']:5.2f}x   start {r['start_s']:5.1f} s   "
              f"clients.json {r['clients_json_bytes']} B", flush=True)


# ------------------------------------------------------------------ 3. client store
def store_checkpoint(num_clients: int, width: int = 610) -> None:
    from fedflat.runtime.checkpoint import load_latest, save_checkpoint
    from fedflat.runtime.client_store import ClientStore

    store = ClientStore()
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1000, width, generator=gen)
    t0 = time.perf_counter()
    for c in range(num_clients):
        store.put(c, {"scaffold/c_i": block[c % 1000]})
    fill = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = save_checkpoint(Path(tmp), 1, {"server": {"client_states": store}}, keep=1)
        save = time.perf_counter() - t0
        size = path.stat().st_size
        t0 = time.perf_counter()
        back = load_latest(Path(tmp))["server"]["client_states"]  # type: ignore[index]
        load = time.perf_counter() - t0
    assert len(back) == num_clients
    print(f"# client store: {num_clients:,} clients x {width} floats "
          f"({store.nbytes() / 2**20:.0f} MiB allocated, file {size / 2**20:.0f} MiB)")
    print(f"store checkpoint: save {save:.2f} s   load {load:.2f} s   "
          f"(filling it: {fill:.2f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the backend comparison")
    ap.add_argument("--pop-rounds", type=int, default=6, help="rounds of each population run")
    ap.add_argument("--pop-backend", default="serial", help="backend of the population runs")
    ap.add_argument("--backends", default="serial,ray,vmap,ray+vmap",
                    help="backends compared with the plain loop; 'none' skips the comparison")
    ap.add_argument("--populations", default="1000,10000,100000,1000000")
    ap.add_argument("--store-clients", type=int, default=100_000)
    ap.add_argument("--population", type=int, help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.population:
        population_child(args.population, args.pop_rounds, args.pop_backend)
        return
    print(f"# load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}", flush=True)
    if args.quick:
        backends(3, ["serial", "vmap"])
        populations([1_000, 10_000], 2, args.pop_backend)
        store_checkpoint(10_000)
    else:
        if args.backends != "none":
            backends(args.rounds, args.backends.split(","))
        if args.populations != "none":
            populations([int(n) for n in args.populations.split(",")], args.pop_rounds,
                        args.pop_backend)
        if args.store_clients:
            store_checkpoint(args.store_clients)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
