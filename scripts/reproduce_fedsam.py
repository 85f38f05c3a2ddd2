"""Reproduce the FedSAM-family comparison (issue 3): final accuracy and λ_max.

Methods: FedAvg, FedSAM, FedASAM, FedSAM+SWA, FedASAM+SWA, SCAFFOLD, FedSMOO, FedLESAM
(the scenario presets of ``fedflat/scenario/local_rule.py``; FedAvg is the plain
scenario), on

* ``femnist``: FEMNIST by writer (LEAF niid sample, 105 writers,
  ``partition: natural``);
* ``cifar10_a0.05`` and ``cifar10_a1``: the CIFAR-10 subset (10 000 training images)
  split over 100 clients with ``dirichlet_per_client`` and ``alpha_scale: total_mass``,
  i.e. client class priors ``Dir(α·p)`` with p uniform (concentration α/C per class):
  the convention of Hsu et al. and of the CIFAR splits shipped with Caldarola et al.
  (ALGORITHMS.md §6.2; α = 0.05 gives ~1.3 classes per client, α = 1 ~4.8).

Each cell is over seeds 0, 1, 2: the final test accuracy (after the last round, of the
model the run evaluates, i.e. the SWA average for the ``*_swa`` methods) as
mean ± sample standard deviation (ddof = 1), and the mean top Hessian eigenvalue λ_max
of that same final model (power iteration with Hessian-vector products on a fixed
subset of the pooled training data, ALGORITHMS.md §7.1). The table goes to
``results/fedsam_table.md`` (and stdout) with the exact command line in its header.

Usage::

    python scripts/reproduce_fedsam.py              # default budget (~1 h, 2 CPU cores)
    python scripts/reproduce_fedsam.py --quick      # smoke budget (< 1 min)
    python scripts/reproduce_fedsam.py --full       # paper-sized budget (GPU machine)
    python scripts/reproduce_fedsam.py --datasets femnist --methods fedavg,fedsam \
        --seeds 0,1
    python scripts/reproduce_fedsam.py --set client.lr=0.02 --jobs 2 --out-dir runs/x

Needs ``FEDFLAT_DATA`` (or ``--data-dir``) pointing at a folder with ``femnist/`` and
``cifar10/``. Run folders go to ``--out-dir/<budget>/<dataset>/<method>/seed<k>``; a
folder that already holds a completed run of the same resolved scenario is reused, so an
interrupted sweep continues where it stopped and the table can be rebuilt for free.

Budgets (all: SGD without momentum, weight decay 4e-4, 1 local epoch, FedAvg server with
η_g = 1 and sample-size weights, uniform sampling without replacement, the presets'
ρ, η_a, SWA start 0.75·T, cycle c = 10, swa_lr 1e-4):

* default (sized from measured CPU time, see below): CNN conv5x5(8)-GN-pool,
  conv5x5(16)-GN-pool, dense 64 (GroupNorm with 4 groups), 5 clients per round, 100
  rounds, client lr 0.05; FEMNIST batch 32 (~4.8 local steps), CIFAR-10 batch 16 (100
  images per client, 7 local steps). Test accuracy on the full FEMNIST test set of the
  105 writers (1 685 images) and on a fixed 5 000-image subset of the CIFAR-10 test set;
  λ_max on 256 training images, at most 20 power iterations (tol 1e-3).
* ``--full`` (ALGORITHMS.md §3.6, paper scripts of debcaldarola/fedsam, cifar10.sh):
  LeNet-style CNN with two conv5x5(64) + max-pool blocks and a dense 384 layer (the zoo
  CNN has one hidden dense layer, so the paper's 384-192 head is 384 here), no
  normalisation, 100 clients, 5 per round, batch 64, 1 local epoch, client lr 0.01,
  wd 4e-4, FedSAM ρ 0.1, FedASAM ρ 0.7 η_a 0.2, SWA start 0.75·T with c = 10,
  10 000 rounds. The shipped CIFAR-10 subset has 10 000 training images, so its clients
  hold 100 images (the paper: 500 from the full 50 000). FEMNIST (our choice, not in the
  paper): LEAF CNN conv(32)-conv(64)-dense 2048, 10 writers per round, batch 20, 2 000
  rounds. Trains on CUDA through the Ray backend (1 actor, 1 GPU) when torch sees a GPU.
* ``--quick``: a few rounds of a tiny CNN on 10 writers / 20 CIFAR clients, one seed
  unless ``--seeds`` says otherwise; only checks that everything runs.

Timing behind the default budget (this 2-core machine, shared, ``runtime.backend
serial``, ``runtime.threads 1``; CPU seconds per round from 40-round runs, CNN 8-16-64):
CIFAR-10 (5 clients x 7 steps of 16) FedAvg 0.24, FedSAM 0.36, SCAFFOLD 0.25,
FedLESAM 0.27; FEMNIST (5 writers x ~4.8 steps of 32) FedAvg 0.13, FedSAM 0.27,
SCAFFOLD 0.17, FedLESAM 0.14. Summed over the 8 methods, 3 seeds and 3 data settings
that is ~21 s per round index, plus ~5 s per run for data loading, evaluation, λ_max
and plots: 100 rounds ≈ 2 100 + 360 s ≈ 41 min of CPU, about an hour of wall time
with the machine shared (wall/CPU measured between 1.0 and 2.2). ``--jobs 2`` runs two
runs at a time (same numbers: every random draw comes from the run's seeded streams).

What ALGORITHMS.md leads us to expect (directions, not numbers; the sources use other
models and far longer budgets):

* §3.6 (Caldarola et al.): FedSAM/FedASAM improve over FedAvg most in the most skewed
  regime (α → 0) and SWA adds several points on top; both lower the sharpness of the
  global model. [UNVERIFIED in the spec: the paper tables were not available.]
* §3.1/§3.3/§3.7/§3.8 (FL-Simulator, ResNet-18-GN, Dir-0.1..0.6 in the per-coordinate
  convention): SCAFFOLD > FedAvg by ~2-3 points, FedSMOO best of all (~+6 points over
  FedAvg at Dir-0.1), MoFedSAM/FedGAMMA in between; FedLESAM ≈ FedSAM at the cost of
  FedAvg.
* The gap between methods shrinks as α grows (α = 1 is mild), and every method is
  lower on α = 0.05 than on α = 1.

How the default budget compares (read it against results/fedsam_table.md): with 100
rounds instead of 10 000 the runs are far from converged, so the effects that need a
long horizon (SWA's averaging of late models, SCAFFOLD's control variates, which each
client refreshes only ~5 times in 100 rounds with 5 % participation) are expected to be
small or absent, whereas SAM's slower early progress (a perturbed gradient) can make
the SAM family trail FedAvg in accuracy while still lowering λ_max. Measured on FEMNIST
(3 seeds, final accuracy / mean λ_max): FedAvg 0.776 ± 0.019 / 23.5, SCAFFOLD
0.757 ± 0.007 / 18.2, FedSMOO 0.673 ± 0.012 / 8.0, FedSAM+SWA 0.638 ± 0.022 / 13.9,
FedSAM 0.633 ± 0.027 / 15.2, FedLESAM 0.555 ± 0.031 / 29.9, FedASAM 0.45 ± 0.17 / 10.5,
FedASAM+SWA 0.38 ± 0.21 / 10.8. So the sharpness direction of §3.6/§3.8 holds (every
two-pass SAM variant ends at a flatter model than FedAvg, FedSMOO the flattest, as it is
the best method of the FL-Simulator table), the accuracy direction does not at this
budget (FedAvg and SCAFFOLD lead; FedSMOO is the best SAM variant), SWA adds nothing
after only 3 averaged models, and the preset radii of FedASAM (ρ = 0.7, unstable across
seeds) and FedLESAM (ρ = 0.5, from the paper's ResNet-18 command; it even ends sharper
than FedAvg) are too large for this small CNN. The presets keep the reference radii on
purpose (``--set client.oracle.rho=...`` changes them for every SAM-family method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

#: Methods in table order; ``fedavg`` is the scenario without a preset.
METHODS: tuple[str, ...] = (
    "fedavg", "fedsam", "fedasam", "fedsam_swa", "fedasam_swa",
    "scaffold", "fedsmoo", "fedlesam",
)  # fmt: skip

METHOD_LABELS: dict[str, str] = {
    "fedavg": "FedAvg",
    "fedsam": "FedSAM (ρ=0.1)",
    "fedasam": "FedASAM (ρ=0.7, η=0.2)",
    "fedsam_swa": "FedSAM + SWA",
    "fedasam_swa": "FedASAM + SWA",
    "scaffold": "SCAFFOLD",
    "fedsmoo": "FedSMOO (ρ=0.1, α=0.1)",
    "fedlesam": "FedLESAM (ρ=0.5)",
}

#: Data settings: dotted scenario keys, and the family whose budget applies.
DATASETS: dict[str, dict[str, Any]] = {
    "femnist": {
        "family": "femnist",
        "label": "FEMNIST (by writer)",
        "keys": {"data.dataset": "femnist", "data.partition.method": "natural"},
    },
    "cifar10_a0.05": {
        "family": "cifar10",
        "label": "CIFAR-10 α=0.05",
        "keys": {
            "data.dataset": "cifar10",
            "data.partition.method": "dirichlet_per_client",
            "data.partition.alpha": 0.05,
            "data.partition.alpha_scale": "total_mass",
        },
    },
    "cifar10_a1": {
        "family": "cifar10",
        "label": "CIFAR-10 α=1",
        "keys": {
            "data.dataset": "cifar10",
            "data.partition.method": "dirichlet_per_client",
            "data.partition.alpha": 1.0,
            "data.partition.alpha_scale": "total_mass",
        },
    },
}

_SMALL_CNN = {"model.name": "cnn", "model.norm": "group", "model.groups": 4}

#: Budget -> "common" keys for every run, per-family keys, "swa" keys for *_swa methods,
#: and the default seeds.
BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": (0,),
        "common": {
            **_SMALL_CNN,
            "model.channels": [4, 8],
            "model.hidden": [16],
            "client.lr": 0.05,
            "client.weight_decay": 4e-4,
            "client.local_steps": 2,
            "server.rounds": 3,
            "server.clients_per_round": 2,
            "eval.every": 3,
            "eval.max_samples": 300,
            "eval.sharpness.num_samples": 64,
            "eval.sharpness.batch_size": 64,
            "eval.sharpness.max_iter": 5,
        },
        "femnist": {"data.num_clients": 10, "client.batch_size": 16},
        "cifar10": {"data.num_clients": 20, "client.batch_size": 16},
        "swa": {"server.swa.start": 0.5, "server.swa.cycle": 1},
    },
    "default": {
        "seeds": (0, 1, 2),
        "common": {
            **_SMALL_CNN,
            "model.channels": [8, 16],
            "model.hidden": [64],
            "client.lr": 0.05,
            "client.weight_decay": 4e-4,
            "client.local_epochs": 1,
            "server.rounds": 100,
            "server.clients_per_round": 5,
            "eval.every": 20,
            "eval.sharpness.num_samples": 256,
            "eval.sharpness.max_iter": 20,
            "eval.sharpness.tol": 1e-3,
        },
        "femnist": {"data.num_clients": 105, "client.batch_size": 32},
        "cifar10": {
            "data.num_clients": 100,
            "client.batch_size": 16,
            "eval.max_samples": 5000,
        },
        "swa": {},
    },
    "full": {
        "seeds": (0, 1, 2),
        "common": {
            "model.name": "cnn",
            "model.norm": "none",
            "client.lr": 0.01,
            "client.weight_decay": 4e-4,
            "client.local_epochs": 1,
            "eval.sharpness.num_samples": 512,
            "eval.sharpness.max_iter": 100,
            "eval.sharpness.tol": 1e-3,
        },
        "femnist": {
            "data.num_clients": 105,
            "model.channels": [32, 64],
            "model.hidden": [2048],
            "client.batch_size": 20,
            "server.rounds": 2000,
            "server.clients_per_round": 10,
            "eval.every": 50,
        },
        "cifar10": {
            "data.num_clients": 100,
            "model.channels": [64, 64],
            "model.hidden": [384],
            "client.batch_size": 64,
            "server.rounds": 10000,
            "server.clients_per_round": 5,
            "eval.every": 100,
        },
        "swa": {"server.swa.start": 0.75, "server.swa.cycle": 10},
    },
}

#: Keys every run sets regardless of the budget (one core per run, final λ_max only).
RUNTIME_KEYS: dict[str, Any] = {
    "runtime.backend": "serial",
    "runtime.threads": 1,
    "eval.sharpness.lambda_max": True,
    "output.checkpoint_every": 0,
    "output.progress": False,
}


# ------------------------------------------------------------------------- scenarios
def build_overrides(
    dataset: str,
    method: str,
    seed: int,
    budget: str,
    extra: dict[str, Any] | None = None,
    *,
    data_dir: str | None = None,
    use_gpu: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (base scenario, dotted overrides) of one run.

    The base holds ``name``, ``seed`` and ``method`` (so the preset expands first);
    every other key is an override, so keys we set win over the preset (as the
    scenario loader documents) and the user's ``extra`` win over ours.
    """
    spec = DATASETS[dataset]
    plan = BUDGETS[budget]
    base: dict[str, Any] = {"name": f"{dataset}-{method}", "seed": int(seed)}
    if method != "fedavg":
        base["method"] = method
    over: dict[str, Any] = dict(RUNTIME_KEYS)
    over.update(plan["common"])
    over.update(plan[spec["family"]])
    over.update(spec["keys"])
    if method.endswith("_swa"):
        over.update(plan["swa"])
    if use_gpu:
        over.update(
            {
                "runtime.backend": "ray",
                "runtime.num_actors": 1,
                "runtime.num_gpus": 1.0,
                "runtime.num_cpus": 1.0,
            }
        )
    if data_dir:
        over["data.data_dir"] = data_dir
    over.update(_oracle_keys_it_takes(base, over, extra or {}))
    if "eval.sharpness.every" not in (extra or {}):
        # λ_max once, on the final model (always measured after the last round).
        over["eval.sharpness.every"] = int(over["server.rounds"])
    return base, over


def _oracle_keys_it_takes(base: dict[str, Any], over: dict[str, Any],
                          extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` without the ``client.oracle.*`` keys that this method's oracle does not
    take: ``--set client.oracle.rho=…`` changes every SAM-family method and leaves the
    SGD-based ones (fedavg, scaffold, fedprox, …), which would refuse the key, as they are."""
    own = {k: v for k, v in extra.items()
           if k.startswith("client.oracle.") and k != "client.oracle.name"}
    if not own:
        return extra
    from fedflat.client.oracles import ORACLE_REGISTRY
    from fedflat.scenario.loader import load_scenario

    rest = {k: v for k, v in extra.items() if k not in own}
    name = load_scenario(base, {**over, **rest}).scenario.client.oracle.name
    takes = set(ORACLE_REGISTRY[name].config.model_fields)
    return {**rest, **{k: v for k, v in own.items() if k.split(".", 2)[2] in takes}}


def resolved(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """The resolved scenario as the run folder's ``scenario.yaml`` will hold it."""
    from fedflat.scenario.loader import load_scenario

    return load_scenario(base, over).scenario.model_dump(mode="json")


def normalised(stored: dict[str, Any]) -> dict[str, Any] | None:
    """A stored ``scenario.yaml`` resolved again by the current schema, or None.

    A run folder written before a key was added to the schema lacks that key; loading
    it again fills the key's default, so it compares equal to a run written after. A
    stored scenario the current schema rejects gives None.
    """
    from fedflat.errors import FedflatError
    from fedflat.scenario.loader import load_scenario

    try:
        return load_scenario(stored).scenario.model_dump(mode="json")
    except (FedflatError, ValueError, TypeError):
        return None


def _comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the keys that do not change what a run computes."""
    out = json.loads(json.dumps(tree, sort_keys=True, default=str))
    out.pop("output", None)
    if isinstance(out.get("data"), dict):
        out["data"].pop("data_dir", None)
    return out


# ------------------------------------------------------------------------- running
@dataclass(frozen=True)
class Job:
    """One run: where it goes and what it is."""

    key: tuple[Any, ...]  # what the run is, e.g. (dataset, method, seed)
    base: dict[str, Any]
    over: dict[str, Any]
    run_dir: str


@dataclass
class Outcome:
    """What happened to one job."""

    job: Job
    status: str  # completed / reused / failed
    seconds: float = 0.0
    message: str = ""
    final_accuracy: float | None = None
    lambda_max: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def reusable(run_dir: Path, base: dict[str, Any], over: dict[str, Any]) -> bool:
    """Whether ``run_dir`` holds a completed run of the same resolved scenario, made by the
    same code revision (summary.json ``code_revision``)."""
    from fedflat._version import code_revision

    summary, stored = run_dir / "summary.json", run_dir / "scenario.yaml"
    if not (summary.is_file() and stored.is_file()):
        return False
    try:
        info = json.loads(summary.read_text())
        old = yaml.safe_load(stored.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if info.get("status") != "completed" or not isinstance(old, dict):
        return False
    if info.get("code_revision") != code_revision():  # a table never mixes code versions
        return False
    old = normalised(old)
    return old is not None and _comparable(old) == _comparable(resolved(base, over))


class LeanRuns:
    """Make a long sweep of small runs cheaper, in this process only.

    * ``cache_data``: keep the last loaded dataset (keyed by every argument of the
      loader), so consecutive runs on the same data set and seed decode it once (the
      CIFAR-10 subset takes ~1.5 s of CPU per load). Loaders return a frozen
      ``Dataset`` that the runtime only indexes (copies), never writes.

    It wraps the loaders of ``fedflat.data.datasets.DATASETS`` for the life of the
    process (workers are separate processes and install their own); a renamed
    registry only loses the saving, never changes a number. (Plots are switched off
    with the scenario key ``output.plots`` instead.)
    """

    installed = False

    @classmethod
    def install(cls, *, cache_data: bool) -> None:
        """Install once per process."""
        if cls.installed:
            return
        cls.installed = True
        if cache_data:
            from fedflat.data import datasets

            last: dict[str, Any] = {}

            def memo(name: str, loader: Callable[..., Any]) -> Callable[..., Any]:
                def load(
                    data_dir: Any, seed: int, num_clients: int, options: dict[str, Any]
                ) -> Any:
                    key = json.dumps(
                        [name, data_dir, seed, num_clients, options],
                        sort_keys=True,
                        default=str,
                    )
                    if last.get("key") != key:
                        last.clear()  # drop the previous data set before loading
                        last.update(
                            key=key, value=loader(data_dir, seed, num_clients, options)
                        )
                    return last["value"]

                return load

            for name, loader in list(datasets.DATASETS.items()):
                datasets.DATASETS[name] = memo(name, loader)


def execute(job: Job, *, cache_data: bool = True) -> Outcome:
    """Run one job (or reuse its folder); never raises, so a sweep keeps going."""
    import torch

    torch.set_num_threads(1)
    LeanRuns.install(cache_data=cache_data)
    import fedflat
    from fedflat.report.tables import last_value, load_run

    path = Path(job.run_dir)
    t0 = time.perf_counter()
    try:
        if reusable(path, job.base, job.over):
            status = "reused"
        else:
            if path.exists():
                if not (path / "scenario.yaml").is_file() and any(path.iterdir()):
                    raise RuntimeError(
                        f"{path} exists and is not a run folder; not touching it"
                    )
                shutil.rmtree(path)  # an unfinished or outdated run of this script
            path.parent.mkdir(parents=True, exist_ok=True)
            fedflat.run(job.base, overrides=job.over, out=path)
            status = "completed"
        rec = load_run(path)
        accs = [
            m["test_accuracy"]
            for m in rec.metrics
            if m.get("test_accuracy") is not None
        ]
        return Outcome(
            job,
            status,
            time.perf_counter() - t0,
            final_accuracy=accs[-1] if accs else None,
            lambda_max=last_value(rec.metrics, "lambda_max"),
            extra={"wall_seconds": rec.summary.get("wall_seconds")},
        )
    except Exception as exc:  # any failure: report it and go on with the sweep
        msg = f"{type(exc).__name__}: {exc}"
        if os.environ.get("REPRODUCE_TRACEBACK"):
            msg += "\n" + traceback.format_exc()
        return Outcome(job, "failed", time.perf_counter() - t0, message=msg)


def run_jobs(
    jobs: Sequence[Job],
    *,
    parallel: int,
    describe: Callable[[Job], str],
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run the jobs (``parallel`` processes at a time), one log line per finished run.

    Jobs that share a data set and seed should be adjacent: each process keeps only the
    last loaded data set (``LeanRuns``).
    """
    outcomes: list[Outcome] = []
    n = len(jobs)

    def report(k: int, out: Outcome) -> None:
        what = describe(out.job)
        if out.status == "failed":
            log(f"[{k}/{n}] {what}: FAILED after {out.seconds:.1f} s: {out.message}")
            return
        acc = "–" if out.final_accuracy is None else f"{out.final_accuracy:.4f}"
        lam = "" if out.lambda_max is None else f", λ_max {out.lambda_max:.2f}"
        log(
            f"[{k}/{n}] {what}: {out.status}, final acc {acc}{lam}, {out.seconds:.1f} s"
        )

    if parallel <= 1:
        for k, job in enumerate(jobs, start=1):
            out = execute(job)
            outcomes.append(out)
            report(k, out)
        return outcomes
    # spawn: a fresh interpreter per worker (no forked torch thread pools).
    with ProcessPoolExecutor(
        max_workers=parallel, mp_context=get_context("spawn")
    ) as pool:
        futures = [pool.submit(execute, job) for job in jobs]
        for k, fut in enumerate(as_completed(futures), start=1):
            out = fut.result()
            outcomes.append(out)
            report(k, out)
    order = {j.run_dir: i for i, j in enumerate(jobs)}
    outcomes.sort(key=lambda o: order[o.job.run_dir])
    return outcomes


# ------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Cell:
    """Statistics of one (row, column) over seeds."""

    n: int
    acc_mean: float
    acc_std: float
    lambda_mean: float


def seed_cell(run_dirs: Sequence[Path]) -> Cell:
    """Mean ± std (ddof=1) of the final accuracy and mean λ_max over the seed runs.

    Uses ``fedflat.report.tables.aggregate_seeds``, which also checks that the runs
    differ only in their seed (after resolving each stored scenario again with the
    current schema, so that a key added to the schema between two runs does not split
    them).

    Raises:
        RuntimeError: the runs do not form one seed group.
    """
    from fedflat.report.tables import aggregate_seeds, last_value, load_run

    records = []
    for p in run_dirs:
        rec = load_run(p)
        again = normalised(rec.scenario)
        records.append(rec if again is None else replace(rec, scenario=again))
    if not records:
        return Cell(0, math.nan, math.nan, math.nan)
    groups = aggregate_seeds(records, ddof=1)
    if len(groups) != 1:
        raise RuntimeError(
            f"runs {[str(p) for p in run_dirs]} differ in more than their seed "
            f"({len(groups)} groups)"
        )
    g = groups[0]
    lams = [
        x
        for x in (last_value(r.metrics, "lambda_max") for r in records)
        if x is not None
    ]
    lam = math.fsum(lams) / len(lams) if lams else math.nan
    return Cell(g.n_measured, g.final_mean, g.final_std, lam)


def fmt_acc(cell: Cell | None, want: int) -> str:
    """``0.6123 ± 0.0101``; the seed count is appended when it is not ``want``."""
    if cell is None or cell.n == 0 or not math.isfinite(cell.acc_mean):
        return "–"
    text = f"{cell.acc_mean:.4f}"
    if math.isfinite(cell.acc_std):
        text += f" ± {cell.acc_std:.4f}"
    if cell.n != want:
        text += f" (n={cell.n})"
    return text


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    """A number, or ``–`` when missing."""
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; all columns but the first right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[j]) for r in rows)]) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(widths[0]) if j == 0 else c.rjust(widths[j])
                for j, c in enumerate(cells)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            "-" * (w + 2) if j == 0 else "-" * (w + 1) + ":"
            for j, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def build_table(
    outcomes: Sequence[Outcome],
    datasets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
) -> str:
    """One row per method; per data setting the accuracy cell and the λ_max cell."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for o in outcomes:
        if o.status != "failed":
            ds, m, _ = o.job.key
            by_key.setdefault((ds, m), []).append(Path(o.job.run_dir))
    header = ["method"]
    for ds in datasets:
        header += [f"{DATASETS[ds]['label']} acc", f"{DATASETS[ds]['label']} λ_max"]
    rows = []
    for m in methods:
        row = [METHOD_LABELS[m]]
        for ds in datasets:
            dirs = by_key.get((ds, m), [])
            cell = seed_cell(dirs) if dirs else None
            row += [
                fmt_acc(cell, len(seeds)),
                fmt_num(cell.lambda_mean if cell else None),
            ]
        rows.append(row)
    return markdown_table(header, rows)


def describe_budget(
    budget: str, datasets: Sequence[str], extra: dict[str, Any]
) -> list[str]:
    """Bullet lines of the settings behind the table."""
    plan = BUDGETS[budget]
    lines = []
    families = sorted({DATASETS[d]["family"] for d in datasets})
    for fam in families:
        keys = {**plan["common"], **plan[fam], **extra}
        shown = {
            k: v
            for k, v in keys.items()
            if k.split(".")[0] in ("model", "client", "server", "eval", "data")
        }
        lines.append(
            f"- {fam}: " + ", ".join(f"`{k}={v}`" for k, v in sorted(shown.items()))
        )
    if plan["swa"]:
        lines.append(
            "- SWA methods also: "
            + ", ".join(f"`{k}={v}`" for k, v in sorted(plan["swa"].items()))
        )
    return lines


def table_document(
    table: str,
    *,
    command: str,
    budget: str,
    datasets: Sequence[str],
    seeds: Sequence[int],
    extra: dict[str, Any],
    outcomes: Sequence[Outcome],
    elapsed: float,
) -> str:
    """The Markdown file: title, command, settings, the table, notes."""
    failed = [o for o in outcomes if o.status == "failed"]
    run_seconds = math.fsum(float(o.extra.get("wall_seconds") or 0.0) for o in outcomes)
    parts = [
        "# FedSAM family: final accuracy and sharpness (issue 3)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget `{budget}`, seeds {', '.join(map(str, seeds))}; "
        f"{len(outcomes)} runs ({sum(o.status == 'reused' for o in outcomes)} reused "
        f"from earlier invocations, {len(failed)} failed); this invocation took "
        f"{elapsed:.0f} s, "
        f"the runs' own wall time sums to {run_seconds:.0f} s.",
        "",
        *describe_budget(budget, datasets, extra),
        "",
        table,
        "",
        "- acc: test accuracy of the final evaluated model (the SWA average for the "
        "`+ SWA` rows) after the last round, mean ± sample std (ddof = 1) over seeds; "
        "`(n=k)` marks cells with fewer runs than seeds.",
        "- λ_max: top Hessian eigenvalue of the training loss at that model, mean over "
        "seeds (power iteration with Hessian-vector products on a fixed training "
        "subset, "
        "ALGORITHMS.md §7.1; it converges to the eigenvalue of largest magnitude, so a "
        "negative value means negative curvature dominates there).",
    ]
    families = {DATASETS[d]["family"] for d in datasets}
    if "cifar10" in families:
        parts.append(
            "- CIFAR-10 α: `dirichlet_per_client` with `alpha_scale: total_mass`, "
            "client priors Dir(α·p), p uniform over the 10 classes (per-class "
            "concentration α/10; Hsu et al. / Caldarola et al. convention, "
            "ALGORITHMS.md §6.2)."
        )
    if "femnist" in families:
        parts.append(
            "- FEMNIST: LEAF niid sample, one client per writer (`partition: natural`)."
        )
    if failed:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {o.job.run_dir}: {o.message.splitlines()[0]}" for o in failed]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------- CLI
def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated selection checked against ``allowed`` (``all``: everything)."""
    if text.strip() == "all":
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)} or 'all'"
        )
    return items


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("no seeds given")
    return seeds


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["client.lr=0.02"]`` -> ``{"client.lr": 0.02}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--set needs KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def common_parser(description: str) -> argparse.ArgumentParser:
    """Options shared by the reproduction scripts."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="smoke budget (about a minute)"
    )
    size.add_argument(
        "--full", action="store_true", help="paper-sized budget (GPU machine)"
    )
    ap.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="comma-separated seeds (default: the budget's)",
    )
    ap.add_argument("--out-dir", default=None, help="parent folder of the run folders")
    ap.add_argument("--table", default=None, help="Markdown file to write")
    ap.add_argument(
        "--data-dir",
        default=None,
        help="data folder (default: $FEDFLAT_DATA, else ../shared/data)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (processes; each uses one torch thread)",
    )
    ap.add_argument(
        "--plots",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="draw each run's PNG plots (default: on, off with --quick)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="scenario override for every run (repeatable), e.g. client.lr=0.02",
    )
    return ap


def find_data_dir(arg: str | None) -> str | None:
    """``--data-dir``, else ``$FEDFLAT_DATA``, else the sibling ``shared/data``."""
    if arg:
        return arg
    env = os.environ.get("FEDFLAT_DATA")
    if env:
        return env
    guess = REPO.parent / "shared" / "data"
    return str(guess) if guess.is_dir() else None


def command_line(argv: Sequence[str]) -> str:
    """The command as typed from the repository root: ``python scripts/x.py ARGS``."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else __file__
    try:
        shown = os.path.relpath(script, REPO)
    except ValueError:  # another drive (Windows)
        shown = script
    return "python " + shlex.join([shown, *argv])


def validate(jobs: Sequence[Job]) -> str | None:
    """Resolve every job's scenario before running any (a bad ``--set`` or data folder
    fails at once); returns the first error message, or None."""
    from fedflat.errors import FedflatError

    try:
        for job in jobs:
            resolved(job.base, job.over)
    except FedflatError as exc:
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write the table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = common_parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--datasets",
        type=lambda s: parse_list(s, list(DATASETS), "dataset"),
        default=list(DATASETS),
        help=f"subset of {', '.join(DATASETS)}",
    )
    ap.add_argument(
        "--methods",
        type=lambda s: parse_list(s, METHODS, "method"),
        default=list(METHODS),
        help=f"subset of {', '.join(METHODS)}",
    )
    args = ap.parse_args(argv)
    budget = "quick" if args.quick else "full" if args.full else "default"
    seeds = args.seeds or list(BUDGETS[budget]["seeds"])
    try:
        extra = parse_sets(args.sets)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    plots = args.plots if args.plots is not None else budget != "quick"
    run_keys = {"output.plots": plots, **extra}  # output.* never changes a number
    out_dir = Path(args.out_dir or REPO / "runs" / "reproduce_fedsam") / budget
    table_path = Path(
        args.table
        or (
            REPO
            / "results"
            / ("tmp/fedsam_table_quick.md" if budget == "quick" else "fedsam_table.md")
        )
    )
    data_dir = find_data_dir(args.data_dir)
    if data_dir is None:
        print(
            "error: no data folder: set FEDFLAT_DATA or pass --data-dir",
            file=sys.stderr,
        )
        return 2
    use_gpu = False
    if budget == "full":
        import torch

        use_gpu = torch.cuda.is_available()
    command = command_line(argv)

    jobs = []
    for (
        ds
    ) in args.datasets:  # data set, then seed outermost: consecutive runs share data
        for s in seeds:
            for m in args.methods:
                base, over = build_overrides(
                    ds, m, s, budget, run_keys, data_dir=data_dir, use_gpu=use_gpu
                )
                jobs.append(
                    Job((ds, m, s), base, over, str(out_dir / ds / m / f"seed{s}"))
                )
    error = validate(jobs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{len(jobs)} runs, budget {budget}, seeds {seeds}, "
        f"run folders under {out_dir}",
        flush=True,
    )
    t0 = time.perf_counter()
    outcomes = run_jobs(
        jobs,
        parallel=args.jobs,
        describe=lambda j: f"{j.key[0]} {j.key[1]} seed {j.key[2]}",
        log=lambda s: print(s, flush=True),
    )
    elapsed = time.perf_counter() - t0
    table = build_table(outcomes, args.datasets, args.methods, seeds)
    doc = table_document(
        table,
        command=command,
        budget=budget,
        datasets=args.datasets,
        seeds=seeds,
        extra=extra,
        outcomes=outcomes,
        elapsed=elapsed,
    )
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.write_text(doc)
    print()
    print(doc, end="")
    print(f"(written to {table_path})")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
