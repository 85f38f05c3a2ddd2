"""Run a sweep: one ``fedflat run`` subprocess per (point, seed), at most ``jobs`` at a time.

Why subprocesses: each run is isolated (a crash or out-of-memory kill of one run does not take
the sweep down), and on Linux every child is bound to the sweep process with
``PR_SET_PDEATHSIG``, so ``kill -9`` of the sweep ends its runs at once instead of leaving
orphans that would race with a rerun. Resuming is per run folder:

- ``summary.json`` says completed (or budget_exhausted): skipped, if the run is of the
  scenario wanted now and was made by this code revision (``fedflat.sweep.reuse``; else it
  runs again);
- the folder has a checkpoint: ``fedflat resume`` (the run's own resume, exact);
- otherwise (never started, or killed before its first checkpoint): started afresh.

So the same command again loses at most the rounds since each run's last checkpoint, and
since resumed runs equal uninterrupted ones, so does the table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fedflat
from fedflat.errors import FedflatError, ScenarioError
from fedflat.runtime.checkpoint import list_checkpoints
from fedflat.runtime.driver import EXIT_DIVERGED, write_json
from fedflat.scenario.loader import load_scenario
from fedflat.sweep.reuse import same_run
from fedflat.sweep.spec import (
    SweepPoint,
    SweepSpec,
    expand_points,
    forced_overrides,
    run_overrides,
    validate,
)

#: Run statuses whose metrics the tables count.
FINISHED = ("completed", "budget_exhausted")
#: Run statuses after which a rerun skips the run: a diverged run would diverge again
#: (the tables report it per point instead of averaging it in).
FINAL = (*FINISHED, "diverged")
INDEX = "sweep.json"
_POLL_S = 0.05


@dataclass
class SweepRun:
    """One (point, seed) of a sweep and its run folder."""

    point: SweepPoint
    seed: int
    run_dir: Path
    status: str = "pending"
    detail: str = ""
    resumed_from: int | None = None
    reused: bool = False  # finished before this invocation and kept (fedflat.sweep.reuse)

    @property
    def name(self) -> str:
        return self.run_dir.name


def run_status(run_dir: Path) -> str:
    """The status in a run folder's summary.json, or ``missing``."""
    try:
        return str(json.loads((run_dir / "summary.json").read_text()).get("status", "unknown"))
    except (OSError, ValueError):
        return "missing"


def default_sweep_dir(spec: SweepSpec) -> Path:
    """``<output.dir>/sweeps/<scenario name>``: fixed, so the same command finds it again."""
    sc = load_scenario(spec.scenario, spec.sets).scenario
    return Path(sc.output.dir) / "sweeps" / sc.name


def plan(spec: SweepSpec, sweep_dir: Path) -> list[SweepRun]:
    """Every (point, seed) with its run folder, in point then seed order."""
    return [SweepRun(p, s, sweep_dir / "runs" / p.folder(s))
            for p in expand_points(spec) for s in spec.seeds]


def write_index(spec: SweepSpec, sweep_dir: Path, runs: list[SweepRun]) -> None:
    """``sweep.json``: what the sweep is and where each of its runs lives."""
    points: dict[int, dict[str, Any]] = {}
    for r in runs:
        p = points.setdefault(r.point.index, {"index": r.point.index, "label": r.point.label,
                                              "overrides": r.point.overrides, "runs": []})
        p["runs"].append({"seed": r.seed, "dir": str(r.run_dir.relative_to(sweep_dir)),
                          "status": run_status(r.run_dir)})
    write_json(sweep_dir / INDEX, {
        "format": 1, "fedflat_version": fedflat.__version__, "identity": spec.identity(),
        "scenario": spec.scenario, "grid": spec.grid, "zip": spec.zip, "seeds": spec.seeds,
        "sets": spec.sets,
        "forced": forced_overrides(spec), "target": spec.target,
        "points": list(points.values()),
    })


def read_index(sweep_dir: str | Path) -> dict[str, Any]:
    """Read a sweep folder's index.

    Raises:
        FedflatError: no ``sweep.json`` there, or it does not parse.
    """
    path = Path(sweep_dir) / INDEX
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FedflatError(f"{sweep_dir} is not a sweep folder: {INDEX} is missing") from None
    except ValueError as exc:
        raise FedflatError(f"{path}: not valid JSON ({exc})") from None


def _check_same_sweep(spec: SweepSpec, sweep_dir: Path) -> None:
    if not (sweep_dir / INDEX).is_file():
        if (sweep_dir / "runs").exists():
            raise ScenarioError(f"{sweep_dir} holds runs but no {INDEX}; choose another --out",
                                file="--out")
        return
    old = read_index(sweep_dir).get("identity", {})
    new = json.loads(json.dumps(spec.identity()))
    for key in ("scenario", "sets", "points"):
        if old.get(key) != new[key]:
            raise ScenarioError(
                f"{sweep_dir} holds a different sweep ({key} differs); rerun the same command "
                "to resume it, or choose another --out", file="--out")


def command_line(spec: SweepSpec, run: SweepRun) -> list[str]:
    """The ``fedflat`` command line of one run: ``resume`` when it left a checkpoint."""
    base = [sys.executable, "-m", "fedflat.cli"]
    if list_checkpoints(run.run_dir):
        return [*base, "resume", str(run.run_dir)]
    cmd = [*base, "run", spec.scenario]
    for item in run_overrides(spec, run.point, run.seed):
        cmd += ["--set", item]
    return [*cmd, "--out", str(run.run_dir)]


def _env() -> dict[str, str]:
    # The children import the same fedflat as this process, wherever it comes from.
    root = str(Path(fedflat.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""),
            "PYTHONUNBUFFERED": "1"}


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def run_sweep(spec: SweepSpec, sweep_dir: str | Path | None = None, *,
              echo: Callable[[str], None] = print) -> list[SweepRun]:
    """Validate every point, then run (or resume, or skip) each (point, seed).

    Args:
        spec: the sweep.
        sweep_dir: its folder (default ``default_sweep_dir``).
        echo: where progress lines go.

    Returns:
        The runs with their final status (``completed``, ``budget_exhausted``, ``failed``,
        ``interrupted``, ...).

    Raises:
        ScenarioError: an invalid point (nothing is run then) or a folder holding another sweep.
    """
    points = expand_points(spec)
    validate(spec, points)
    folder = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(spec)
    _check_same_sweep(spec, folder)
    runs = plan(spec, folder)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "logs").mkdir(exist_ok=True)
    write_index(spec, folder, runs)
    forced = forced_overrides(spec)
    if forced.get("runtime.backend"):
        echo("note: runs use runtime.backend=serial (the sweep runs several at once); "
             "--set runtime.backend=ray to keep Ray inside each run")
    todo = []
    for r in runs:
        status = run_status(r.run_dir)
        same = r.run_dir.exists() and same_run(r.run_dir, spec.scenario,
                                               run_overrides(spec, r.point, r.seed))
        if status in FINAL and same:
            r.status, r.reused = status, True
        else:
            # Killed before its first checkpoint, or made by other code or from another
            # base scenario (reuse keys on both, see fedflat.sweep.reuse): start afresh.
            if r.run_dir.exists() and not (same and list_checkpoints(r.run_dir)):
                shutil.rmtree(r.run_dir)
            todo.append(r)
    skipped = len(runs) - len(todo)
    echo(f"sweep {folder}: {len(points)} points x {len(spec.seeds)} seeds = {len(runs)} runs"
         + (f", {skipped} already finished" if skipped else "") + f", {spec.jobs} at a time")
    try:
        _execute(spec, todo, folder, len(runs), skipped, echo)
    finally:
        write_index(spec, folder, runs)
    return runs


def _launcher(spec: SweepSpec) -> Any:
    from fedflat.sweep.launch import InlineLauncher, RayLauncher, SubprocessLauncher

    if spec.inline and not spec.ray:
        return InlineLauncher()
    if not spec.ray:
        return SubprocessLauncher()
    address = load_scenario(spec.scenario, spec.sets).scenario.runtime.address
    return RayLauncher(address, spec.jobs)


def _execute(spec: SweepSpec, todo: list[SweepRun], folder: Path, total: int, done: int,
             echo: Callable[[str], None]) -> None:
    pending = list(todo)
    running: dict[Any, tuple[SweepRun, float]] = {}
    env = _env()
    launcher = _launcher(spec) if todo else None
    try:
        while pending or running:
            while pending and len(running) < spec.jobs:
                r = pending.pop(0)
                ckpts = list_checkpoints(r.run_dir)
                r.status = "running"
                r.resumed_from = int(ckpts[-1].stem.split("_")[1]) if ckpts else None
                handle = launcher.start(command_line(spec, r), folder / "logs" / f"{r.name}.log",
                                        env)
                running[handle] = (r, time.perf_counter())
            finished = [(h, rc) for h in list(running) if (rc := launcher.poll(h)) is not None]
            for handle, returncode in finished:
                r, t0 = running.pop(handle)
                done += 1
                status = run_status(r.run_dir)
                r.status = status if returncode in (0, EXIT_DIVERGED) else (
                    "interrupted" if returncode == 130 else "failed")
                if r.status == "failed":
                    r.detail = _last_line(folder / "logs" / f"{r.name}.log")
                acc = _summary_acc(r.run_dir)
                echo(f"[{done}/{total}] {r.name}: {r.status}"
                     + (f" (resumed from round {r.resumed_from})"
                        if r.resumed_from is not None else "")
                     + (f", final test accuracy {acc:.4f}" if acc is not None else "")
                     + f" ({time.perf_counter() - t0:.1f} s)"
                     + (f": {r.detail}" if r.detail else ""))
            if running:
                time.sleep(_POLL_S)
    except KeyboardInterrupt:
        launcher.interrupt(list(running))
        for r, _ in running.values():
            r.status = "interrupted"
        raise
    finally:
        if launcher is not None:
            launcher.close()


def _summary_acc(run_dir: Path) -> float | None:
    try:
        acc = json.loads((run_dir / "summary.json").read_text()).get("final_test_accuracy")
    except (OSError, ValueError):
        return None
    return float(acc) if isinstance(acc, int | float) else None
