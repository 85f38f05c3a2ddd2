"""Tables whose cells are sweeps: what the reproduction scripts share.

A reproduction script's grid is a list of cells (say method × data setting); each cell is
one scenario over seeds, run as a sweep in its own folder (``run_cells``), so it is
resumable and reuses finished runs exactly as ``fedflat sweep`` does (same scenario, same
code revision: ``fedflat.sweep.reuse``). ``seed_cell`` turns a cell's finished runs into
mean ± sample sd of the final test accuracy and the mean λ_max of the final model;
``markdown_table`` lays the cells out. The scripts' shared command line options are
``script_parser`` and friends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fedflat.errors import FedflatError
from fedflat.scenario.loader import load_scenario
from fedflat.sweep.reuse import normalised
from fedflat.sweep.runner import (
    FINISHED,
    INDEX,
    SweepRun,
    plan,
    read_index,
    run_sweep,
    write_index,
)
from fedflat.sweep.spec import SweepSpec

#: The keys a cell keeps against the sweep's forced ones (serial, no progress, no plots).
_KEPT_KEYS = ("runtime.", "output.plots")


@dataclass(frozen=True)
class CellJob:
    """One cell: ``base`` (holding ``name`` and ``method``, so that a preset expands first)
    with dotted ``over`` on top, over ``seeds``, as a sweep in ``folder``."""

    key: tuple[Any, ...]
    base: dict[str, Any]
    over: dict[str, Any]
    folder: Path
    seeds: tuple[int, ...]


@dataclass
class CellOutcome:
    """What happened to one cell: its runs (one per seed) and the time it took."""

    job: CellJob
    runs: list[SweepRun] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    @property
    def finished_runs(self) -> list[SweepRun]:
        """The runs that the tables count (completed, budget_exhausted), in seed order."""
        return [r for r in self.runs if r.status in FINISHED]

    @property
    def finished(self) -> list[Path]:
        """The run folders of ``finished_runs``."""
        return [r.run_dir for r in self.finished_runs]

    @property
    def failed(self) -> list[SweepRun]:
        return [r for r in self.runs if r.status not in (*FINISHED, "diverged")]

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.runs)

    @property
    def problems(self) -> list[str]:
        """One line per run that did not finish (or the cell's own error)."""
        if self.error:
            return [f"{self.job.folder}: {self.error.splitlines()[0]}"]
        return [f"{r.run_dir}: {r.status}" + (f": {r.detail}" if r.detail else "")
                for r in self.failed]

    def round_metrics(self) -> list[list[dict[str, Any]]]:
        """Per run of ``finished_runs``, its training rounds' records of metrics.jsonl (what
        ``fedflat.run`` returns as ``RunResult.metrics``)."""
        from fedflat.report.tables import load_run, training_rounds

        return [training_rounds(load_run(d).metrics) for d in self.finished]

    def wall_seconds(self) -> float:
        """The runs' own wall time (summary.json ``wall_seconds``), summed."""
        total = 0.0
        for r in self.runs:
            try:
                total += float(json.loads((r.run_dir / "summary.json").read_text())
                               .get("wall_seconds") or 0.0)
            except (OSError, ValueError):
                continue
        return total


def _nested(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the dotted keys of ``over`` set in it (as ``--set`` would)."""
    out = yaml.safe_load(yaml.safe_dump(base))
    for key, value in over.items():
        node = out
        *path, leaf = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def cell_spec(job: CellJob) -> SweepSpec:
    """The sweep of a cell; writes its base scenario (``base.yaml``) into its folder."""
    job.folder.mkdir(parents=True, exist_ok=True)
    path = job.folder / "base.yaml"
    path.write_text(yaml.safe_dump(_nested(job.base, job.over), sort_keys=False))
    kept = [f"{k}={json.dumps(v)}" for k, v in job.over.items() if k.startswith(_KEPT_KEYS)]
    return SweepSpec(scenario=str(path), sets=kept, seeds=list(job.seeds))


def validate_cells(jobs: Sequence[CellJob]) -> str | None:
    """Resolve every cell's scenario for every seed before running any; the first error
    message, or None."""
    try:
        for job in jobs:
            for seed in job.seeds:
                load_scenario(job.base, {**job.over, "seed": seed})
    except FedflatError as exc:
        return str(exc)
    return None


def run_cell(job: CellJob, inline: bool = False) -> CellOutcome:
    """Run (or reuse, or resume) one cell's seeds; never raises, so a table keeps going.
    ``inline``: the runs in this process (``fedflat.sweep.launch.InlineLauncher``)."""
    t0 = time.perf_counter()
    try:
        spec = cell_spec(job)
        spec.inline = inline
        if (job.folder / INDEX).is_file() and \
                read_index(job.folder).get("identity") != json.loads(json.dumps(spec.identity())):
            # Which runs are kept is decided per run (fedflat.sweep.reuse); the folder is
            # the script's, so another --plots only changes what reruns, not whether.
            write_index(spec, job.folder, plan(spec, job.folder))
        runs = run_sweep(spec, job.folder, echo=lambda _: None)
        return CellOutcome(job, runs, time.perf_counter() - t0)
    except Exception as exc:  # a broken cell is reported in the table, the rest goes on
        return CellOutcome(job, [], time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")


def run_cells(jobs: Sequence[CellJob], *, parallel: int = 1,
              describe: Callable[[CellJob], str] = lambda j: str(j.key),
              log: Callable[[str], None] = print) -> list[CellOutcome]:
    """Run the cells, one log line per cell; outcomes in the order of ``jobs``. One at a
    time, the runs are made in this process; ``parallel`` > 1 runs that many cells at once,
    each run its own ``fedflat run`` process."""
    n = len(jobs)
    done = 0

    def report(out: CellOutcome) -> None:
        nonlocal done
        done += 1
        what = describe(out.job)
        if out.error:
            log(f"[{done}/{n}] {what}: FAILED after {out.seconds:.1f} s: {out.error}")
            return
        cell = seed_cell(out.finished) if out.finished else None
        acc = "–" if cell is None else f"{cell.acc_mean:.4f}"
        lam = "" if cell is None or not math.isfinite(cell.lambda_mean) else \
            f", λ_max {cell.lambda_mean:.2f}"
        bad = "".join(f"; {r.name} {r.status}: {r.detail}" for r in out.failed)
        log(f"[{done}/{n}] {what}: {len(out.runs)} runs ({out.reused} reused), final acc "
            f"{acc}{lam}, {out.seconds:.1f} s{bad}")

    if parallel <= 1:  # in this process: small runs would mostly pay for imports
        outcomes = []
        for job in jobs:
            outcomes.append(run_cell(job, inline=True))
            report(outcomes[-1])
        return outcomes
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        futures = [pool.submit(run_cell, job) for job in jobs]
        for fut in futures:
            report(fut.result())
        return [f.result() for f in futures]


# ------------------------------------------------------------------------- table cells
@dataclass(frozen=True)
class SeedCell:
    """Statistics of one table cell over its seeds."""

    n: int
    acc_mean: float
    acc_std: float
    lambda_mean: float


def seed_cell(run_dirs: Sequence[Path]) -> SeedCell:
    """Mean ± sample std (ddof 1) of the final test accuracy, and the mean λ_max, of runs
    that differ only in their seed (each stored scenario resolved again by the current
    schema first, so that a key added between two runs does not split them).

    Raises:
        RuntimeError: the runs differ in more than their seed.
    """
    from fedflat.report.tables import aggregate_seeds, last_value, load_run

    records = []
    for p in run_dirs:
        rec = load_run(p)
        again = normalised(rec.scenario)
        records.append(rec if again is None else replace(rec, scenario=again))
    if not records:
        return SeedCell(0, math.nan, math.nan, math.nan)
    groups = aggregate_seeds(records, ddof=1)
    if len(groups) != 1:
        raise RuntimeError(f"runs {[str(p) for p in run_dirs]} differ in more than their seed "
                           f"({len(groups)} groups)")
    g = groups[0]
    lams = [x for x in (last_value(r.metrics, "lambda_max") for r in records) if x is not None]
    lam = math.fsum(lams) / len(lams) if lams else math.nan
    return SeedCell(g.n_measured, g.final_mean, g.final_std, lam)


def fmt_acc(cell: SeedCell | None, want: int) -> str:
    """``0.6123 ± 0.0101``; ``(n=k)`` appended when k is not ``want``; ``–`` when empty."""
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


def publish_table(doc: str, path: Path, outcomes: Sequence[CellOutcome]) -> int:
    """Write a script's table document, print it and where it went; the exit code (1 when a
    cell had problems, the table still written so the rest can be read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)
    print()
    print(doc, end="")
    print(f"(written to {path})")
    return 1 if any(o.problems for o in outcomes) else 0


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; every column but the first right-aligned."""
    rows = [list(r) for r in rows]
    widths = [max([len(h), *(len(r[j]) for r in rows)]) for j, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j])
                                 for j, c in enumerate(cells)) + " |"

    rule = "|" + "|".join("-" * (w + 2) if j == 0 else "-" * (w + 1) + ":"
                          for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# ------------------------------------------------------------------------- command line
def parse_list(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """A comma-separated selection checked against ``allowed`` (``all``: everything)."""
    if text.strip() == "all":
        return list(allowed)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {bad or text!r}; choose from {', '.join(allowed)} or 'all'")
    return items


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` -> [0, 1, 2]."""
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, got {text!r}") from None
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


def script_parser(description: str) -> argparse.ArgumentParser:
    """The options every cell-table script takes (budget, seeds, folders, jobs, --set)."""
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke budget (about a minute)")
    size.add_argument("--full", action="store_true", help="paper-sized budget (GPU machine)")
    ap.add_argument("--seeds", type=parse_seeds, default=None,
                    help="comma-separated seeds (default: the budget's)")
    ap.add_argument("--out-dir", default=None, help="parent folder of the cells' sweep folders")
    ap.add_argument("--table", default=None, help="Markdown file to write")
    ap.add_argument("--data-dir", default=None,
                    help="data folder (default: $FEDFLAT_DATA, else ../shared/data)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="cells at a time (1: runs in this process; more: a process per run)")
    ap.add_argument("--plots", action=argparse.BooleanOptionalAction, default=None,
                    help="draw each run's PNG plots (default: on, off with --quick)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="scenario override for every run (repeatable), e.g. client.lr=0.02")
    return ap


def find_data_dir(arg: str | None, repo: Path) -> str | None:
    """``--data-dir``, else ``$FEDFLAT_DATA``, else ``shared/data`` beside ``repo``."""
    if arg:
        return arg
    env = os.environ.get("FEDFLAT_DATA")
    if env:
        return env
    guess = repo.parent / "shared" / "data"
    return str(guess) if guess.is_dir() else None


def command_line(argv: Sequence[str], repo: Path) -> str:
    """The command as typed from the repository root: ``python scripts/x.py ARGS``."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "script.py"
    try:
        shown = os.path.relpath(script, repo)
    except ValueError:  # another drive (Windows)
        shown = script
    return "python " + shlex.join([shown, *argv])
