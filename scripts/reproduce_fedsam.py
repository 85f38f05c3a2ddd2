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
``cifar10/``. Each (data setting, method) cell is a sweep over the seeds
(``fedflat.sweep.cells``) in ``--out-dir/<budget>/<dataset>/<method>/`` (run folders
``runs/p000-s<k>``, indexed in ``sweep.json``); a run folder that already holds a finished
run of the same resolved scenario, made by the same code revision, is reused exactly as
``fedflat sweep`` reuses it, so an interrupted invocation continues where it stopped and
the table can be rebuilt for free.

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
cells at a time (same numbers: every random draw comes from the run's seeded streams).

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
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedflat.sweep.cells import (  # noqa: E402
    CellJob,
    CellOutcome,
    command_line,
    find_data_dir,
    fmt_acc,
    fmt_num,
    markdown_table,
    parse_list,
    parse_sets,
    publish_table,
    run_cells,
    script_parser,
    seed_cell,
    validate_cells,
)

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


def build_table(
    outcomes: Sequence[CellOutcome],
    datasets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
) -> str:
    """One row per method; per data setting the accuracy cell and the λ_max cell."""
    by_key = {o.job.key: o.finished for o in outcomes}
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
    outcomes: Sequence[CellOutcome],
    elapsed: float,
) -> str:
    """The Markdown file: title, command, settings, the table, notes."""
    failed = [line for o in outcomes for line in o.problems]
    run_seconds = math.fsum(o.wall_seconds() for o in outcomes)
    n_runs = sum(len(o.runs) for o in outcomes)
    parts = [
        "# FedSAM family: final accuracy and sharpness (issue 3)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget `{budget}`, seeds {', '.join(map(str, seeds))}; "
        f"{n_runs} runs ({sum(o.reused for o in outcomes)} reused "
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
        parts += [f"- {line}" for line in failed]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep and write the table; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = script_parser(__doc__.splitlines()[0])
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
    data_dir = find_data_dir(args.data_dir, REPO)
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
    command = command_line(argv, REPO)

    # The grid: one cell per (data setting, method), each a sweep over the seeds.
    jobs = []
    for ds in args.datasets:
        for m in args.methods:
            base, over = build_overrides(ds, m, seeds[0], budget, run_keys,
                                         data_dir=data_dir, use_gpu=use_gpu)
            jobs.append(CellJob((ds, m), base, over, out_dir / ds / m, tuple(seeds)))
    error = validate_cells(jobs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(jobs) * len(seeds)} runs, budget {budget}, seeds {seeds}, "
          f"sweep folders under {out_dir}", flush=True)
    t0 = time.perf_counter()
    outcomes = run_cells(jobs, parallel=args.jobs, describe=lambda j: f"{j.key[0]} {j.key[1]}",
                         log=lambda s: print(s, flush=True))
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
    return publish_table(doc, table_path, outcomes)


if __name__ == "__main__":
    sys.exit(main())
