"""Reproduce the robust-aggregation comparison (issue 5): rules x attacks x splits.

Final test accuracy on MNIST for the rules mean, median, trimmed_mean, krum,
geometric_median and centered_clipping, each without and with bucketing (s = 2), under
the attacks none, sign_flip, label_flip, alie and ipm, on an IID and a non-IID split
of 25 clients that all take part in every round, 5 of them Byzantine (``attack.fraction
0.2``: floor(0.2·25) = 5 clients drawn once per run from the seed's attack stream) —
the n = 25, f = 5 setting of the epfml experiments (ALGORITHMS.md §5.3b).

Usage::

    python scripts/reproduce_byzantine.py          # default budget (~1 h, 2 CPU cores)
    python scripts/reproduce_byzantine.py --quick  # smoke budget (< 1 min)
    python scripts/reproduce_byzantine.py --rules median,krum --attacks none,alie \\
        --partitions noniid --bucketing on --seeds 0,1 --jobs 2

Writes ``results/byzantine_table.md`` (and prints it): one table per split, one row per
rule (± bucketing), one column per attack; each cell is the final test accuracy on the
10 000 MNIST test images (mean ± sample std over seeds when there are several). Each
cell is a sweep over the seeds (``fedflat.sweep.cells``) in
``--out-dir/<budget>/<split>/<rule>[_b2]/<attack>/`` (run folders ``runs/p000-s<k>``);
finished runs of the same scenario and code revision are reused as ``fedflat sweep`` does.

Default budget (all keys are scenario keys; ``--set`` overrides any of them):

* data: MNIST (60 000 training images), 25 clients; ``iid`` = ``partition: iid``;
  ``noniid`` = ``partition: shards`` with 2 label-sorted shards of 1 200 images per
  client (McMahan et al.; most clients hold 2 digits — milder than the epfml split,
  which gives each worker one contiguous chunk of the sorted data).
* model: MLP 784-100-10. Clients: SGD, lr 0.1, batch 32, 5 local steps per round
  (a round's delta plays the role of the epfml worker gradient, ALGORITHMS.md §5
  "per-round delta" granularity), no momentum. Server: the rule's output is applied
  with η_g = 1, 80 rounds (FedAvg reaches ~91 % IID, ~90 % non-IID in pilots).
* rules: uniform client weights (as the reference code); ``trim_ratio 0.2``
  (b = 5 = f of 25, the reference's b = f); Krum with ``num_byzantine 5`` (with
  bucketing: 13 buckets, f stays 5, as in the reference code; n ≥ 2f + 3 holds);
  geometric median with the RFA defaults (ν 1e-5, ≤ 4 Weiszfeld iterations, mean
  init); centered clipping with L = 3 iterations and τ = 1 in delta units (pilots:
  honest client deltas have norms between 0.25 and 1, so τ = 1 clips no honest client
  without attack and clips the sign-flipped ones; the bucketing paper's τ = 10 is in
  gradient units).
* attacks: sign_flip (send −Δ), label_flip (train on 9 − y), alie (z by the epfml rule:
  z = 0.253 for n = 25, f = 5), ipm (ε = 0.1, the reference code's value).

``--full`` is the same with 300 rounds and seeds 0, 1, 2 (for a bigger machine).

Timing behind the default (measured on this 2-core machine while it was shared; CPU
seconds, ``runtime.backend serial``, ``runtime.threads 1``): one round of 25 clients x
5 steps of the MLP costs ~0.16 s for every rule (the aggregation itself is a few ms on
25 x 79 510 numbers), an 80-round run ~15 s including data loading and evaluation
(every 20 rounds). 6 rules x 2 bucketing x 5 attacks x 2 splits = 120 runs ≈ 30 min of
CPU, 45-60 min of wall time with the machine shared (``--jobs 2`` halves it on an idle
machine). Most of a round's time is the worker gathering each client's whole
training set (2 400 images) before taking its 5 steps, not the training itself.
Measured: 6 default runs (Krum, RFA, CClip with bucketing, none/ALIE, non-IID) took
92.6 s of CPU (15.4 s per run, plots included) and 213 s of wall time at a load
average of ~8 on the 2 cores. ``--quick`` (2 rounds of 1 local step, evaluation on
500 test images, the non-IID split only unless ``--partitions`` says otherwise) runs
every rule x bucketing x attack cell in well under a minute.

What ALGORITHMS.md §5.3 leads us to expect (directions; the reference numbers come from
per-step aggregation of worker gradients/momenta, a CNN and long-tailed MNIST in (a)):

* (a) Without attack, heterogeneity alone hurts the robust rules: IID → non-IID costs
  Krum ~8 points, CM ~17, RFA ~16, while Avg and CClip lose nothing; bucketing (s = 2)
  recovers most of it (CM 95.6, RFA 97.3, Krum 93.3 of ~98).
* (b) Non-IID with f = 5 of 25 (β = 0): Krum and CM are weak under every attack (Krum
  1-77 %, CM 34-75 %); ALIE (75 % for CM, 77 % for Krum) and IPM hurt them; RFA
  collapses under IPM (16 %); CClip stays at 75-92 %; bucketing raises CM, RFA and CClip
  (RFA 88-92 %, CClip 92-93 %).
* With per-round deltas from 5 local steps, FedAvg-style mean aggregation is itself
  fairly robust to these bounded attacks at f/n = 0.2 (sign flip leaves 15/25 of the
  honest mean, IPM 0.78 of it), so the interesting contrasts are the robust rules'
  losses under non-IID data and what bucketing buys back.

The mixing grid (issue 14, ``--grid mixing``)::

    python scripts/reproduce_byzantine.py --grid mixing           # ~15 min, 1 core
    python scripts/reproduce_byzantine.py --grid mixing --quick   # smoke (< 1 min)

checks the direction of "Fixing by Mixing" (Allouah et al., AISTATS 2023) on the
non-IID split above (same 25 clients, f = 5, same model and client budget, 40
rounds): the rules median, trimmed mean (β = 0.2), Krum (f = 5) and the geometric
median (RFA, 4 iterations), each alone, with NNM in front (``pre: [nnm]``: each delta
→ the mean of its n − f = 20 nearest deltas) and with ARC in front (``pre: [arc]``: the
k = floor(2 (f/n)(n − f)) = 8 largest deltas clipped to the 9th largest norm), under
no attack, the optimised ALIE and IPM (``attack.optimize: true``: per round the factor
of largest simulated damage among the default and a short grid, z in {0.5, 1, 2, 4},
ε in {0.5, 2, 10, 100}, so that the grid fits ~15 min on one core) and
Mimic (the epfml heuristic, 20 warm-up rounds); a Mean row is the non-robust
reference. The table goes to ``results/byzantine_mixing_table.md``. The direction to
check: without attack NNM recovers most of the accuracy that heterogeneity costs the
classic rules (the paper's claim), and under attack the rules with NNM in front stay
closer to the Mean's no-attack accuracy than the rules alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedflat.scenario.aggregation import PRE_NEEDS_NUM_BYZANTINE, RULE_SPECS, RuleSpec  # noqa: E402
from fedflat.sweep import cells  # noqa: E402
from fedflat.sweep.cells import CellJob, CellOutcome  # noqa: E402

RULES: tuple[str, ...] = (
    "mean", "median", "trimmed_mean", "krum", "geometric_median", "centered_clipping",
)  # fmt: skip
RULE_LABELS: dict[str, str] = {
    "mean": "Mean",
    "median": "CM (median)",
    "trimmed_mean": "TM (β=0.2)",
    "krum": "Krum (f=5)",
    "geometric_median": "RFA (geom. median)",
    "centered_clipping": "CClip (τ=1, L=3)",
}
ATTACKS: tuple[str, ...] = ("none", "sign_flip", "label_flip", "alie", "ipm")
ATTACK_LABELS: dict[str, str] = {
    "none": "none",
    "sign_flip": "BF (sign flip)",
    "label_flip": "LF (label flip)",
    "alie": "ALIE",
    "ipm": "IPM (ε=0.1)",
}
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"label": "IID", "keys": {"data.partition.method": "iid"}},
    "noniid": {
        "label": "non-IID (2 label shards per client)",
        "keys": {
            "data.partition.method": "shards",
            "data.partition.shards_per_client": 2,
        },
    },
}
BUCKETING: dict[str, int | None] = {"off": None, "on": 2}

NUM_CLIENTS = 25
BYZANTINE_FRACTION = 0.2  # floor(0.2 * 25) = 5 = f

COMMON: dict[str, Any] = {
    "data.dataset": "mnist",
    "data.num_clients": NUM_CLIENTS,
    "model.name": "mlp",
    "model.hidden": [100],
    "client.optimizer": "sgd",
    "client.lr": 0.1,
    "client.batch_size": 32,
    "server.clients_per_round": NUM_CLIENTS,
    "server.aggregation.weighting": "uniform",
    "server.aggregation.num_byzantine": 5,
    "server.aggregation.trim_ratio": 0.2,
    "server.aggregation.tau": 1.0,
    "server.aggregation.iters": 3,
    "runtime.backend": "serial",
    "runtime.threads": 1,
    "output.checkpoint_every": 0,
    "output.progress": False,
}
_AGG = "server.aggregation."


def _for_rule(over: dict[str, Any]) -> dict[str, Any]:
    """Drop the COMMON rule keys the chosen rule does not take (a rule takes only its own)."""
    spec: RuleSpec = RULE_SPECS[over[_AGG + "rule"]]
    wraps = ("rule", "weighting", "pre", "clip_norm", "bucket_size")
    takes = set(spec.params) | set(wraps)
    if set(over.get(_AGG + "pre") or ()) & set(PRE_NEEDS_NUM_BYZANTINE):
        takes.add("num_byzantine")
    return {k: v for k, v in over.items()
            if not k.startswith(_AGG) or k.removeprefix(_AGG) in takes}


BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": (0,),
        "partitions": ("noniid",),
        "keys": {
            "client.local_steps": 1,
            "server.rounds": 2,
            "eval.every": 2,
            "eval.max_samples": 500,
        },
    },
    "default": {
        "seeds": (0,),
        "keys": {"client.local_steps": 5, "server.rounds": 80, "eval.every": 20},
    },
    "full": {
        "seeds": (0, 1, 2),
        "keys": {"client.local_steps": 5, "server.rounds": 300, "eval.every": 20},
    },
}


# -------------------- the mixing grid (issue 14)

MIX_RULES: tuple[str, ...] = ("mean", "median", "trimmed_mean", "krum", "geometric_median")
MIX_PRE: dict[str, list[str]] = {"none": [], "nnm": ["nnm"], "arc": ["arc"]}
MIX_PRE_LABELS: dict[str, str] = {"none": "", "nnm": " + NNM", "arc": " + ARC"}
MIX_ATTACKS: tuple[str, ...] = ("none", "alie_opt", "ipm_opt", "mimic")
MIX_ATTACK_LABELS: dict[str, str] = {
    "none": "none",
    "alie_opt": "ALIE (optimised z)",
    "ipm_opt": "IPM (optimised ε)",
    "mimic": "Mimic",
}
_ALL_ATTACKS: tuple[str, ...] = (*ATTACKS, *(a for a in MIX_ATTACKS if a not in ATTACKS))
MIX_ATTACK_KEYS: dict[str, dict[str, Any]] = {
    "none": {"attack.kind": "none"},
    # Shorter grids than the documented defaults (5 simulated aggregations per round
    # with the default factor, not 15-16) keep the grid within ~15 min on one core.
    "alie_opt": {"attack.kind": "alie", "attack.optimize": True,
                 "attack.factor_grid": [0.5, 1.0, 2.0, 4.0]},
    "ipm_opt": {"attack.kind": "ipm", "attack.optimize": True,
                "attack.factor_grid": [0.5, 2.0, 10.0, 100.0]},
    "mimic": {"attack.kind": "mimic"},
}
MIX_BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "seeds": (0,),
        "keys": {
            "client.local_steps": 1,
            "server.rounds": 2,
            "eval.every": 2,
            "eval.max_samples": 500,
            "attack.mimic_warmup": 1,
        },
    },
    "default": {
        "seeds": (0,),
        "keys": {"client.local_steps": 5, "server.rounds": 40, "eval.every": 20},
    },
    "full": {
        "seeds": (0, 1, 2),
        "keys": {"client.local_steps": 5, "server.rounds": 300, "eval.every": 20},
    },
}


def mix_pairs(rules: Sequence[str], pres: Sequence[str]) -> list[tuple[str, str]]:
    """The (rule, pre) rows of the mixing table; the Mean runs without pre only."""
    return [(r, q) for r in rules for q in pres if r != "mean" or q == "none"]


def build_mix_overrides(
    rule: str,
    pre: str,
    attack: str,
    seed: int,
    budget: str,
    extra: dict[str, Any] | None = None,
    *,
    data_dir: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (base scenario, dotted overrides) of one run of the mixing grid."""
    base: dict[str, Any] = {"name": f"mix-noniid-{rule}-{pre}-{attack}", "seed": int(seed)}
    over: dict[str, Any] = dict(COMMON)
    over.update(PARTITIONS["noniid"]["keys"])
    over["server.aggregation.rule"] = rule
    over["server.aggregation.pre"] = list(MIX_PRE[pre])
    if rule == "geometric_median":  # RFA's official 4 iterations, as in the first table
        over["server.aggregation.max_iters"] = 4
    over.update(MIX_ATTACK_KEYS[attack])
    if attack != "none":
        over["attack.fraction"] = BYZANTINE_FRACTION
    budget_keys = dict(MIX_BUDGETS[budget]["keys"])
    if attack != "mimic":
        budget_keys.pop("attack.mimic_warmup", None)
    over.update(budget_keys)
    if data_dir:
        over["data.data_dir"] = data_dir
    over.update(extra or {})
    return base, _for_rule(over)


def build_mix_table(
    outcomes: Sequence[CellOutcome],
    pairs: Sequence[tuple[str, str]],
    attacks: Sequence[str],
    seeds: Sequence[int],
) -> str:
    """Rows rule (+ pre), columns attack; the non-IID split."""
    by_key = {o.job.key: o.finished for o in outcomes}
    header = ["rule", *(MIX_ATTACK_LABELS[a] for a in attacks)]
    rows = []
    for rule, pre in pairs:
        row = [RULE_LABELS[rule] + MIX_PRE_LABELS[pre]]
        for att in attacks:
            dirs = by_key.get((rule, pre, att), [])
            cell = cells.seed_cell(dirs) if dirs else None
            row.append(cells.fmt_acc(cell, len(seeds)))
        rows.append(row)
    return f"### {PARTITIONS['noniid']['label']}\n\n" + cells.markdown_table(header, rows)


def mix_document(
    table: str,
    *,
    command: str,
    budget: str,
    seeds: Sequence[int],
    extra: dict[str, Any],
    outcomes: Sequence[CellOutcome],
    elapsed: float,
) -> str:
    """The Markdown file of the mixing grid."""
    failed = [line for o in outcomes for line in o.problems]
    run_seconds = sum(o.wall_seconds() for o in outcomes)
    keys = {**COMMON, **PARTITIONS["noniid"]["keys"], **MIX_BUDGETS[budget]["keys"], **extra}
    shown = ", ".join(
        f"`{k}={v}`"
        for k, v in sorted(keys.items())
        if not k.startswith(("runtime.", "output."))
    )
    parts = [
        "# Fixing by Mixing: NNM and ARC in front of the classic rules (issue 14)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget `{budget}`, seeds {', '.join(map(str, seeds))}; "
        f"{sum(len(o.runs) for o in outcomes)} runs "
        f"({sum(o.reused for o in outcomes)} reused, {len(failed)} failed); "
        f"this invocation took {elapsed:.0f} s, the runs' own wall time sums to "
        f"{run_seconds:.0f} s.",
        "",
        f"Settings: {shown}; with an attack `attack.fraction={BYZANTINE_FRACTION}` "
        "(f = 5 of n = 25 clients, fixed per run).",
        "",
        table,
        "",
        "- Cells: test accuracy of the final global model on the MNIST test set, mean ± "
        "sample std over seeds where there are several.",
        "- NNM: each of the 25 deltas is replaced by the mean of its 20 nearest deltas "
        "(itself included) before the rule; ARC: the 8 largest-norm deltas are clipped "
        "to the norm of the 9th largest.",
        "- ALIE / IPM (optimised): each round the Byzantine clients try z in {0.253 "
        "(the epfml z), 0.5, 1, 2, 4} / ε in {0.1, 0.5, 2, 10, 100} and send the one "
        "whose simulated aggregate (rule, pre-aggregation, weighting) is farthest from "
        "the honest mean. Mimic: all 5 copy the honest client picked by the epfml "
        "heuristic (fixed after 20 warm-up rounds).",
    ]
    if failed:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {line}" for line in failed]
    return "\n".join(parts) + "\n"


def build_overrides(
    partition: str,
    rule: str,
    bucketing: str,
    attack: str,
    seed: int,
    budget: str,
    extra: dict[str, Any] | None = None,
    *,
    data_dir: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (base scenario, dotted overrides) of one run; ``extra`` wins."""
    name = f"{partition}-{rule}{'-b2' if BUCKETING[bucketing] else ''}-{attack}"
    base: dict[str, Any] = {"name": name, "seed": int(seed)}
    over: dict[str, Any] = dict(COMMON)
    over.update(BUDGETS[budget]["keys"])
    over.update(PARTITIONS[partition]["keys"])
    over["server.aggregation.rule"] = rule
    over["server.aggregation.bucket_size"] = BUCKETING[bucketing]
    if rule == "geometric_median":  # the table was made with RFA's official 4 iterations
        over["server.aggregation.max_iters"] = 4
    over["attack.kind"] = attack
    if attack != "none":
        over["attack.fraction"] = BYZANTINE_FRACTION
    if data_dir:
        over["data.data_dir"] = data_dir
    over.update(extra or {})
    return base, _for_rule(over)


def build_tables(
    outcomes: Sequence[CellOutcome],
    partitions: Sequence[str],
    rules: Sequence[str],
    bucketings: Sequence[str],
    attacks: Sequence[str],
    seeds: Sequence[int],
) -> str:
    """One Markdown table per split: rows rule (± bucketing), columns attack."""
    by_key = {o.job.key: o.finished for o in outcomes}
    blocks = []
    for part in partitions:
        header = ["rule", *(ATTACK_LABELS[a] for a in attacks)]
        rows = []
        for rule in rules:
            for buck in bucketings:
                label = RULE_LABELS[rule] + (
                    " + bucketing s=2" if BUCKETING[buck] else ""
                )
                row = [label]
                for att in attacks:
                    dirs = by_key.get((part, rule, buck, att), [])
                    cell = cells.seed_cell(dirs) if dirs else None
                    row.append(cells.fmt_acc(cell, len(seeds)))
                rows.append(row)
        blocks.append(
            f"### {PARTITIONS[part]['label']}\n\n" + cells.markdown_table(header, rows)
        )
    return "\n\n".join(blocks)


def table_document(
    tables: str,
    *,
    command: str,
    budget: str,
    seeds: Sequence[int],
    extra: dict[str, Any],
    outcomes: Sequence[CellOutcome],
    elapsed: float,
) -> str:
    """The Markdown file: title, command, settings, the tables, notes."""
    failed = [line for o in outcomes for line in o.problems]
    run_seconds = sum(o.wall_seconds() for o in outcomes)
    keys = {**COMMON, **BUDGETS[budget]["keys"], **extra}
    shown = ", ".join(
        f"`{k}={v}`"
        for k, v in sorted(keys.items())
        if not k.startswith(("runtime.", "output."))
    )
    parts = [
        "# Robust aggregation under attacks and heterogeneity (issue 5)",
        "",
        f"Command: `{command}`",
        "",
        f"Budget `{budget}`, seeds {', '.join(map(str, seeds))}; "
        f"{sum(len(o.runs) for o in outcomes)} runs "
        f"({sum(o.reused for o in outcomes)} reused, "
        f"{len(failed)} failed); "
        f"this invocation took {elapsed:.0f} s, the runs' own wall time sums to "
        f"{run_seconds:.0f} s.",
        "",
        f"Settings: {shown}; with an attack `attack.fraction={BYZANTINE_FRACTION}` "
        f"(f = 5 of n = 25 clients, fixed per run).",
        "",
        tables,
        "",
        "- Cells: test accuracy of the final global model on the MNIST test set, "
        "mean ± "
        "sample std over seeds where there are several.",
        "- Bucketing s=2: the 25 deltas are randomly permuted, averaged in 13 buckets "
        "of "
        "at most 2, and the rule is applied to the bucket means (Krum keeps f = 5).",
        "- Attacks: BF = the Byzantine clients send −Δ; LF = they train on labels "
        "9 − y; "
        "ALIE = μ − zσ of the honest deltas (z = 0.253, epfml rule); IPM = −0.1 × the "
        "honest mean.",
    ]
    if failed:
        parts += ["", "Failed runs:", ""]
        parts += [f"- {line}" for line in failed]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the grid and write the tables; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = cells.script_parser(__doc__.splitlines()[0])
    ap.add_argument(
        "--rules",
        type=lambda s: cells.parse_list(s, RULES, "rule"),
        default=list(RULES),
        help=f"subset of {', '.join(RULES)}",
    )
    ap.add_argument(
        "--attacks",
        type=lambda s: cells.parse_list(s, _ALL_ATTACKS, "attack"),
        default=list(ATTACKS),
        help=f"subset of {', '.join(ATTACKS)} (mixing grid: {', '.join(MIX_ATTACKS)})",
    )
    ap.add_argument(
        "--partitions",
        type=lambda s: cells.parse_list(s, list(PARTITIONS), "partition"),
        default=None,
        help="subset of iid, noniid (default both; --quick: noniid)",
    )
    ap.add_argument(
        "--bucketing",
        type=lambda s: cells.parse_list(s, list(BUCKETING), "bucketing"),
        default=list(BUCKETING),
        help="subset of off, on (s=2)",
    )
    ap.add_argument(
        "--grid",
        choices=("classic", "mixing"),
        default="classic",
        help="classic: rules x bucketing x attacks x splits (issue 5); mixing: rules x "
        "{none, nnm, arc} x optimised attacks on the non-IID split (issue 14)",
    )
    ap.add_argument(
        "--pre",
        type=lambda s: cells.parse_list(s, list(MIX_PRE), "pre"),
        default=list(MIX_PRE),
        help="mixing grid: subset of none, nnm, arc",
    )
    args = ap.parse_args(argv)
    if args.grid == "mixing":
        return main_mixing(args, argv)
    if any(a not in ATTACKS for a in args.attacks):
        ap.error(f"--attacks: the classic grid takes {', '.join(ATTACKS)}")
    budget = "quick" if args.quick else "full" if args.full else "default"
    seeds = args.seeds or list(BUDGETS[budget]["seeds"])
    partitions = args.partitions or list(BUDGETS[budget].get("partitions", PARTITIONS))
    try:
        extra = cells.parse_sets(args.sets)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    plots = args.plots if args.plots is not None else budget != "quick"
    run_keys = {"output.plots": plots, **extra}  # output.* never changes a number
    out_dir = Path(args.out_dir or REPO / "runs" / "reproduce_byzantine") / budget
    table_path = Path(
        args.table
        or (
            REPO
            / "results"
            / (
                "tmp/byzantine_table_quick.md"
                if budget == "quick"
                else "byzantine_table.md"
            )
        )
    )
    data_dir = cells.find_data_dir(args.data_dir, REPO)
    if data_dir is None:
        print(
            "error: no data folder: set FEDFLAT_DATA or pass --data-dir",
            file=sys.stderr,
        )
        return 2
    command = cells.command_line(argv, REPO)

    # The grid: one cell per (split, rule, bucketing, attack), each a sweep over the seeds.
    jobs = []
    for part in partitions:
        for rule in args.rules:
            for buck in args.bucketing:
                for att in args.attacks:
                    base, over = build_overrides(part, rule, buck, att, seeds[0], budget,
                                                 run_keys, data_dir=data_dir)
                    folder = f"{rule}_b2" if BUCKETING[buck] else rule
                    jobs.append(CellJob((part, rule, buck, att), base, over,
                                        out_dir / part / folder / att, tuple(seeds)))
    error = cells.validate_cells(jobs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(jobs) * len(seeds)} runs, budget {budget}, seeds {seeds}, "
          f"sweep folders under {out_dir}", flush=True)
    t0 = time.perf_counter()
    outcomes = cells.run_cells(
        jobs, parallel=args.jobs,
        describe=lambda j: "{} {}{} {}".format(j.key[0], j.key[1],
                                               " b2" if BUCKETING[j.key[2]] else "", j.key[3]),
        log=lambda s: print(s, flush=True))
    elapsed = time.perf_counter() - t0
    tables = build_tables(
        outcomes, partitions, args.rules, args.bucketing, args.attacks, seeds
    )
    doc = table_document(
        tables,
        command=command,
        budget=budget,
        seeds=seeds,
        extra=extra,
        outcomes=outcomes,
        elapsed=elapsed,
    )
    return cells.publish_table(doc, table_path, outcomes)


def main_mixing(args: Any, argv: Sequence[str]) -> int:
    """The mixing grid: run it and write ``results/byzantine_mixing_table.md``."""
    budget = "quick" if args.quick else "full" if args.full else "default"
    seeds = args.seeds or list(MIX_BUDGETS[budget]["seeds"])
    explicit = [a for a in argv if a.startswith(("--rules", "--attacks"))]
    rules = args.rules if any(a.startswith("--rules") for a in explicit) else list(MIX_RULES)
    attacks = (
        args.attacks if any(a.startswith("--attacks") for a in explicit) else list(MIX_ATTACKS)
    )
    bad = [r for r in rules if r not in MIX_RULES] + [a for a in attacks if a not in MIX_ATTACKS]
    if bad:
        print(f"error: not in the mixing grid: {bad}; rules {list(MIX_RULES)}, attacks "
              f"{list(MIX_ATTACKS)}", file=sys.stderr)
        return 2
    try:
        extra = cells.parse_sets(args.sets)
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plots = args.plots if args.plots is not None else budget != "quick"
    run_keys = {"output.plots": plots, **extra}
    out_dir = Path(args.out_dir or REPO / "runs" / "reproduce_byzantine_mixing") / budget
    table_path = Path(args.table or REPO / "results" / (
        "tmp/byzantine_mixing_table_quick.md" if budget == "quick"
        else "byzantine_mixing_table.md"))
    data_dir = cells.find_data_dir(args.data_dir, REPO)
    if data_dir is None:
        print("error: no data folder: set FEDFLAT_DATA or pass --data-dir", file=sys.stderr)
        return 2
    pairs = mix_pairs(rules, args.pre)
    jobs = []
    for rule, pre in pairs:
        for att in attacks:
            base, over = build_mix_overrides(rule, pre, att, seeds[0], budget, run_keys,
                                             data_dir=data_dir)
            jobs.append(CellJob((rule, pre, att), base, over,
                                out_dir / f"{rule}_{pre}" / att, tuple(seeds)))
    error = cells.validate_cells(jobs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(jobs) * len(seeds)} runs, mixing grid, budget {budget}, seeds {seeds}, "
          f"sweep folders under {out_dir}", flush=True)
    t0 = time.perf_counter()
    outcomes = cells.run_cells(jobs, parallel=args.jobs,
                               describe=lambda j: "{} {} {}".format(*j.key),
                               log=lambda s: print(s, flush=True))
    elapsed = time.perf_counter() - t0
    doc = mix_document(
        build_mix_table(outcomes, pairs, attacks, seeds),
        command=cells.command_line(argv, REPO),
        budget=budget,
        seeds=seeds,
        extra=extra,
        outcomes=outcomes,
        elapsed=elapsed,
    )
    return cells.publish_table(doc, table_path, outcomes)


if __name__ == "__main__":
    sys.exit(main())
