#!/usr/bin/env bash
# Clients per second on one GPU: 1, 2 and 4 Ray client actors sharing it (num_gpus 1/k each),
# each actor training its chunk one client after another ("serial") or all at once
# (runtime.vectorize, "vmap"), for the --full CIFAR-10 CNN of scripts/reproduce_fedsam.py
# (conv5x5(64)-pool-conv5x5(64)-pool-dense 384, batch 64, 1 local epoch, 100 images per client).
#
#   scripts/bench_gpu.sh            # on a machine with one CUDA GPU, < 5 min
#   scripts/bench_gpu.sh --cpu      # dry run without a GPU: digits, tiny CNN, 1 actor, 2 rounds
#
# Needs FEDFLAT_DATA with cifar10/ (falls back to the built-in digits images, and says so).
# Prints one line per configuration and writes the table as JSON to ${OUT:-results}/bench_gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python - "$@" <<'PY'
import argparse, json, os, sys, tempfile, time
from pathlib import Path

import torch

ap = argparse.ArgumentParser(prog="bench_gpu.sh")
ap.add_argument("--cpu", action="store_true", help="dry run on CPU with a tiny budget")
ap.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration")
ap.add_argument("--clients-per-round", type=int, default=None)
ap.add_argument("--actors", default=None, help="comma-separated actor counts (default 1,2,4)")
args = ap.parse_args()
gpu = not args.cpu
if gpu and not torch.cuda.is_available():
    sys.exit("bench_gpu.sh: no CUDA device (torch.cuda.is_available() is False); "
             "use --cpu for a dry run")
rounds = args.rounds or (6 if gpu else 1)
per_round = args.clients_per_round or (20 if gpu else 4)
actor_counts = [int(a) for a in (args.actors or ("1,2,4" if gpu else "1")).split(",")]

import ray  # noqa: E402

import fedflat  # noqa: E402
from fedflat.runtime.backends import RAY_SYSTEM_CONFIG  # noqa: E402

data_dir = os.environ.get("FEDFLAT_DATA")
# The dry run checks the script, not the figures: the built-in digits load in < 1 s.
dataset = "cifar10" if gpu and data_dir and Path(data_dir, "cifar10").exists() else "digits"
if dataset == "digits" and gpu:
    print("bench_gpu: FEDFLAT_DATA has no cifar10/; using the built-in digits images",
          flush=True)
model = ({"name": "cnn", "norm": "none", "channels": [64, 64], "hidden": [384]} if gpu
         else {"name": "cnn", "norm": "none", "channels": [8, 8], "hidden": [32]})
base = {
    "name": "bench_gpu", "seed": 0,
    "data": {"dataset": dataset, "num_clients": 100, "data_dir": data_dir,
             "partition": {"method": "dirichlet_per_client", "alpha": 1.0,
                           "alpha_scale": "total_mass"}},
    "model": model,
    "client": {"lr": 0.01, "weight_decay": 4e-4, "batch_size": 64, "local_epochs": 1},
    "server": {"rounds": rounds + 1, "clients_per_round": per_round},
    "eval": {"every": 10_000, "max_samples": 256},
    "output": {"checkpoint_every": 0, "plots": False, "progress": False},
}
cores = os.cpu_count() or 2
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # as the Ray backend does
ray.init(num_cpus=max(cores, max(actor_counts)), num_gpus=1 if gpu else 0, include_dashboard=False,
         log_to_driver=False, configure_logging=False, _system_config=RAY_SYSTEM_CONFIG)
rows = []
work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
try:
    for engine in ("serial", "vmap"):
        for k in actor_counts:
            runtime = {"backend": "ray", "num_actors": k, "vectorize": engine == "vmap",
                       "num_cpus": max(1, cores // k) if gpu else 1,
                       "num_gpus": round(1.0 / k, 6) if gpu else 0.0}
            t0 = time.perf_counter()
            res = fedflat.run({**base, "runtime": runtime}, out=work / f"{engine}{k}")
            timed = res.metrics[1:]  # round 0 warms up (CUDA context, kernels, vmap tracing)
            secs = sum(m["round_seconds"] for m in timed)
            clients = sum(len(m["clients"]) for m in timed)
            row = {"engine": engine, "actors": k, "num_gpus_per_actor": runtime["num_gpus"],
                   "clients_per_s": clients / secs, "s_per_round": secs / len(timed),
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(f"{engine:6s} actors={k} num_gpus={runtime['num_gpus']:<6g} "
                  f"{row['clients_per_s']:8.1f} clients/s  {row['s_per_round']:.3f} s/round  "
                  f"(run {row['wall_s']:.0f} s)", flush=True)
finally:
    ray.shutdown()
device = torch.cuda.get_device_name(0) if gpu else "cpu (dry run)"
out = Path(os.environ.get("OUT") or "results")
out.mkdir(parents=True, exist_ok=True)
(out / "bench_gpu.json").write_text(json.dumps(
    {"device": device, "dataset": dataset, "model": model, "clients_per_round": per_round,
     "timed_rounds": rounds, "command": "scripts/bench_gpu.sh " + " ".join(sys.argv[1:]),
     "rows": rows}, indent=2) + "\n")
print(f"bench_gpu: {device}; table in {out / 'bench_gpu.json'}")
PY
