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
   ``--data femnist``: the LEAF FEMNIST writers of ``$FEDFLAT_DATA`` (natural partition, one
   client per writer: all 105 writers with training data); ``--data mnist``: MNIST's 60k
   training images split over 10⁴ / 5·10⁴ clients by ``dirichlet_per_client`` (α = 0.5,
   Hsu et al.); a population above 60,000 is refused (a client needs a sample). Skipped, with
   a line saying so, when the data directory is absent.
3. A ClientStore of 10⁵ clients × 610 floats (the logistic model's size, e.g. SCAFFOLD's c_i or
   an error-feedback residual) written and read with the run's checkpoint functions.
4. ``--flower 100,1000,10000``: ``fedflat flower simulate`` (one virtual SuperNode per client)
   next to ``serial`` and ``ray`` at the same cohort (pooled Synthetic(1,1), 10 per round,
   logistic, 5 local steps): seconds per round and the ratio to serial, start-up, peak RSS.

Peak memory: every run's process tree is watched (/proc, every 0.2 s): the driver's peak RSS
(VmHWM), and with Ray the peak of the server actor, of each client actor (max and sum) and of
Ray's own processes (GCS, raylet, idle workers), as lines ``rss ...``.

Usage: python scripts/bench_scale.py [--quick] [--rounds 20] [--pop-rounds 6]
  [--pop-backend serial,ray,vmap] [--backends serial,ray,vmap,ray+vmap|none]
  [--data synthetic|femnist|mnist] [--populations 1000,10000,100000,1000000|none]
  [--store-clients 100000|0] [--flower 100,1000,10000|none]
  --quick: a smoke run (< 60 s): plain/serial/vmap only, populations 10³ and 10⁴, store 10⁴.
  --quick --data mnist / --quick --flower N: a smoke run of that path alone.
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
import threading
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


# ------------------------------------------------------------------ process memory
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _proc(pid: int) -> tuple[str, float, float] | None:
    """(title, peak RSS, private RSS now) in MB of a live process; None once it is gone.
    The private part (RssAnon) leaves out pages shared with other processes, such as the
    data set that Ray actors read from the object store."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            fields = dict(ln.split(":", 1) for ln in f if ln.startswith(("VmHWM", "RssAnon")))
    except OSError:
        return None

    def mb(key: str) -> float:
        return int(fields.get(key, "0 kB").split()[0]) / 1024

    return title, mb("VmHWM"), mb("RssAnon")


class ProcessWatch:
    """Peak RSS of this process and of every descendant (Ray's processes: ray.init started
    here makes them children of this process, so other users' Ray clusters stay out),
    labelled by the process title Ray sets (``ray::_ClientActor``, ``ray::_ServerActor``,
    Flower's ``ray::ClientAppActor``)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.peak: dict[int, float] = {}
        self.anon: dict[int, float] = {}
        self.label: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            kids, todo = _children(), [me]
            while todo:
                pid = todo.pop()
                todo.extend(kids.get(pid, []))
                got = _proc(pid)
                if got is None:
                    continue
                title, mb, anon = got
                self.peak[pid] = max(self.peak.get(pid, 0.0), mb)
                self.anon[pid] = max(self.anon.get(pid, 0.0), anon)
                if pid == me:
                    self.label[pid] = "driver"
                elif "Actor" in title and title.startswith("ray::"):
                    self.label[pid] = title.split()[0][5:].split(".")[0].lstrip("_")
                else:
                    self.label.setdefault(pid, "ray")
            self._stop.wait(self.every)

    def __enter__(self) -> ProcessWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        """MB: driver, server actor, client actors (max, sum, count), Ray's other processes."""
        by: dict[str, list[float]] = {}
        private: dict[str, list[float]] = {}
        for pid, mb in self.peak.items():
            by.setdefault(self.label.get(pid, "ray"), []).append(mb)
            private.setdefault(self.label.get(pid, "ray"), []).append(self.anon.get(pid, 0.0))
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"driver": driver, "ray_other": sum(by.get("ray", []))}
        for name, key in (("ServerActor", "server"), ("ClientActor", "client"),
                          ("ClientAppActor", "client")):
            if by.get(name):
                out[f"{key}_max"] = max(by[name])
                out[f"{key}_private_max"] = max(private[name])
                out[f"{key}_sum"] = out.get(f"{key}_sum", 0.0) + sum(by[name])
                out[f"{key}_count"] = out.get(f"{key}_count", 0) + len(by[name])
        out["total"] = driver + sum(mb for pid, mb in self.peak.items()
                                    if self.label.get(pid) != "driver")
        return out


def rss_line(m: dict[str, float]) -> str:
    parts = [f"driver {m['driver']:.0f}"]
    if "server_max" in m:
        parts.append(f"server actor {m['server_max']:.0f} (private "
                     f"{m['server_private_max']:.0f})")
    if "client_max" in m:
        parts.append(f"client actors {int(m['client_count'])} x <= {m['client_max']:.0f} "
                     f"(private {m['client_private_max']:.0f}; sum {m['client_sum']:.0f})")
    if m["ray_other"]:
        parts.append(f"ray processes {m['ray_other']:.0f}")
    return "rss MB: " + ", ".join(parts) + f"; tree {m['total']:.0f}"


# ------------------------------------------------------------------ 2. populations
DATASETS = ("synthetic", "femnist", "mnist")
FEMNIST_WRITERS = 105  # writers with training data in the vendored LEAF sample (SOURCE.md)
MNIST_TRAIN = 60_000


def data_block(data: str, n: int) -> dict:
    if data == "femnist":
        return {"dataset": "femnist", "num_clients": n, "partition": {"method": "natural"}}
    if data == "mnist":
        return {"dataset": "mnist", "num_clients": n,
                "partition": {"method": "dirichlet_per_client", "alpha": 0.5,
                              "alpha_scale": "total_mass"}}
    # capped sizes: a 10⁶-device heavy tail would otherwise hold single devices of 10⁵+
    # samples, and the comparison across populations is about N
    return {"dataset": "synthetic", "num_clients": n,
            "synthetic": {"on_demand": True, "max_size": 1000}}


def population_scenario(n: int, rounds: int, backend: str, data: str = "synthetic",
                        per_round: int = 100) -> dict:
    return {
        "name": "bench_scale", "seed": 0,
        "data": data_block(data, n),
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 32, "local_steps": 5},
        "server": {"rounds": rounds, "clients_per_round": min(per_round, n)},
        "runtime": {"backend": "ray" if backend == "flower" else backend, "num_actors": 2,
                    "num_cpus": 1, "threads": 1},
        "eval": {"every": 1, "max_samples": 2000},
        "output": {"checkpoint_every": 0, "progress": False, "plots": False},
    }


def population_child(n: int, rounds: int, backend: str, data: str, per_round: int,
                     pooled: bool) -> None:
    """Runs in a subprocess: one population on one backend, prints one JSON line."""
    import fedflat

    torch.set_num_threads(1)
    sc = population_scenario(n, rounds, backend, data, per_round)
    if pooled:  # Flower's comparison: pooled devices, sizes capped as above (uncapped, 10⁴
        # pooled devices took 6.6 GB and 196 s to generate in every process that builds them)
        sc["data"]["synthetic"] = {"max_size": 1000}
    t0 = time.perf_counter()
    with ProcessWatch() as watch, tempfile.TemporaryDirectory() as tmp:
        if backend == "flower":
            from fedflat.flower.simulate import simulate

            res = simulate(sc, out=f"{tmp}/run")
        else:
            res = fedflat.run(sc, out=f"{tmp}/run")
        clients_json = os.path.getsize(f"{tmp}/run/clients.json")
    total = time.perf_counter() - t0
    per_round_s = [m["round_seconds"] for m in res.metrics]
    steady = per_round_s[1:] or per_round_s
    mem = watch.summary()
    print(json.dumps({"n": n, "round_s": statistics.median(steady),
                      "start_s": total - sum(per_round_s), "rss_mb": mem["driver"],
                      "mem": mem, "clients_json_bytes": clients_json}))


def _child(n: int, rounds: int, backend: str, data: str, per_round: int = 100,
           pooled: bool = False) -> dict | str:
    cmd = [sys.executable, __file__, "--population", str(n), "--pop-rounds", str(rounds),
           "--pop-backend", backend, "--data", data, "--per-round", str(per_round)]
    out = subprocess.run([*cmd, *(["--pooled"] if pooled else [])], capture_output=True,
                         text=True, check=False)
    if out.returncode:
        tail = out.stderr.strip().splitlines()
        line = tail[-1] if tail else f"exit {out.returncode}"
        return line if len(line) <= 400 else line[:400] + " ..."  # Flower lists every node
    return json.loads(out.stdout.strip().splitlines()[-1])


def data_missing(data: str) -> str | None:
    """Why ``data`` cannot run here (no FEDFLAT_DATA, or its file missing), else None."""
    if data == "synthetic":
        return None
    root = os.environ.get("FEDFLAT_DATA")
    rel = {"femnist": "femnist/femnist_leaf_niid005.npz", "mnist": "mnist/mnist.npz"}[data]
    if not root:
        return f"--data {data} needs FEDFLAT_DATA (the folder holding {rel})"
    if not (Path(root) / rel).is_file():
        return f"--data {data}: {Path(root) / rel} not found"
    return None


def populations(sizes: list[int], rounds: int, backends_: list[str],
                data: str = "synthetic") -> None:
    what = {"synthetic": "on-demand synthetic devices",
            "femnist": "FEMNIST writers (natural partition)",
            "mnist": "MNIST, dirichlet_per_client alpha 0.5"}[data]
    missing = data_missing(data)
    if missing:
        print(f"# populations: skipped: {missing}", flush=True)
        return
    print(f"# populations: {what}, 100 per round, logistic, 5 local steps, eval on 2000 "
          f"samples every round, {rounds} rounds, backends {','.join(backends_)}, one "
          "subprocess each", flush=True)
    for backend in backends_:
        base = None
        for n in sizes:
            r = _child(n, rounds, backend, data)
            if isinstance(r, str):
                print(f"population {n:>9,} {backend:6}: refused/failed: {r}", flush=True)
                continue
            base = r if base is None else base
            print(f"population {n:>9,} {backend:6}: {r['round_s'] * 1e3:8.1f} ms/round "
                  f"{r['round_s'] / base['round_s']:5.2f}x   peak RSS {r['rss_mb']:7.0f} MB "
                  f"{r['rss_mb'] / base['rss_mb']:5.2f}x   start {r['start_s']:5.1f} s   "
                  f"clients.json {r['clients_json_bytes']} B", flush=True)
            if backend == "ray":
                print(f"  {rss_line(r['mem'])}", flush=True)


# ------------------------------------------------------------------ 4. Flower
def flower(sizes: list[int], rounds: int, per_round: int = 10) -> None:
    """``fedflat flower simulate`` next to serial and ray at the same cohort."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("# flower: skipped: flwr is not installed", flush=True)
        return
    print(f"# flower: pooled Synthetic(1,1) (max_size 1000), {per_round} per round, logistic, "
          f"5 local steps, {rounds} rounds; ratio = seconds per round / serial's at the same "
          "population; flower = one virtual SuperNode per client, 2 workers", flush=True)
    for n in sizes:
        base = None
        for backend in ("serial", "ray", "flower"):
            r = _child(n, rounds, backend, "synthetic", per_round, pooled=True)
            if isinstance(r, str):
                print(f"flower {n:>7,} {backend:6}: failed: {r}", flush=True)
                continue
            base = r if base is None else base
            print(f"flower {n:>7,} {backend:6}: {r['round_s'] * 1e3:8.1f} ms/round "
                  f"{r['round_s'] / base['round_s']:6.2f}x   start {r['start_s']:5.1f} s   "
                  f"{rss_line(r['mem'])}", flush=True)


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
    ap.add_argument("--pop-backend", default="serial",
                    help="backends of the population runs, comma-separated")
    ap.add_argument("--backends", default="serial,ray,vmap,ray+vmap",
                    help="backends compared with the plain loop; 'none' skips the comparison")
    ap.add_argument("--data", default="synthetic", choices=DATASETS,
                    help="data of the population runs (femnist, mnist: from $FEDFLAT_DATA)")
    ap.add_argument("--populations", default=None,
                    help="comma-separated (default: synthetic 1000,10000,100000,1000000; "
                    f"femnist {FEMNIST_WRITERS}; mnist 10000,50000)")
    ap.add_argument("--store-clients", type=int, default=100_000)
    ap.add_argument("--flower", default="none",
                    help="populations of the Flower comparison, e.g. 100,1000,10000")
    ap.add_argument("--population", type=int, help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--per-round", type=int, default=100, help=argparse.SUPPRESS)
    ap.add_argument("--pooled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.population:
        population_child(args.population, args.pop_rounds, args.pop_backend, args.data,
                         args.per_round, args.pooled)
        return
    pops = args.populations or {"synthetic": "1000,10000,100000,1000000",
                                "femnist": str(FEMNIST_WRITERS), "mnist": "10000,50000"}[args.data]
    pop_backends = args.pop_backend.split(",")
    print(f"# load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}", flush=True)
    if args.quick and (args.data != "synthetic" or args.flower != "none"):
        # the smoke run of one new path: 2 rounds, the smallest sizes
        if args.data != "synthetic":
            small = {"femnist": [FEMNIST_WRITERS], "mnist": [2_000]}[args.data]
            populations(small, 2, pop_backends, args.data)
        if args.flower != "none":
            flower([int(n) for n in args.flower.split(",")], 2)
    elif args.quick:
        backends(3, ["serial", "vmap"])
        populations([1_000, 10_000], 2, pop_backends)
        store_checkpoint(10_000)
    else:
        if args.backends != "none":
            backends(args.rounds, args.backends.split(","))
        if pops != "none":
            populations([int(n) for n in pops.split(",")], args.pop_rounds, pop_backends,
                        args.data)
        if args.store_clients:
            store_checkpoint(args.store_clients)
        if args.flower != "none":
            flower([int(n) for n in args.flower.split(",")], args.pop_rounds)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
