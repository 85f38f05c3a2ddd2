"""``run`` and ``resume``: a scenario (or a run folder) to a finished run folder.

They check what can be checked before a run folder exists (preflight, trackers), choose the
driver for the scenario (federated, gossip or personalized; :mod:`fedflat.runtime.driver`)
and restore a run from its checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from fedflat.comm.asynchronous import AsyncState
from fedflat.errors import FedflatError
from fedflat.runtime.build import FederatedData
from fedflat.runtime.checkpoint import latest_checkpoint
from fedflat.runtime.driver import (
    Runner,
    RunResult,
    changed_keys,
    computed_keys,
    load_data,
    new_run_dir,
)
from fedflat.runtime.preflight import preflight
from fedflat.scenario.loader import LoadedScenario, load_scenario
from fedflat.scenario.schema import Scenario


def _runner(loaded: LoadedScenario, run_dir: Path, fed: FederatedData) -> Runner:
    """The driver of this scenario: the federated one, the gossip one (``topology:``) or
    the personalized one (``personalization:``); the latter two import this module."""
    if loaded.scenario.topology.kind != "none":
        from fedflat.decentralized.runner import GossipRunner

        return GossipRunner(loaded, run_dir, fed)
    if loaded.scenario.personalization.method != "none":
        from fedflat.personalization.runner import PersonalRunner

        return PersonalRunner(loaded, run_dir, fed)
    return Runner(loaded, run_dir, fed)


def run(
    source: str | Path | dict[str, Any] | Scenario,
    overrides: dict[str, Any] | list[str] | None = None,
    out: str | Path | None = None,
) -> RunResult:
    """Run a scenario and return its result.

    Args:
        source: a scenario YAML path, a dict, or a Scenario.
        overrides: ``{"server.rounds": 5}`` or ``["server.rounds=5"]`` (like ``--set``).
        out: the run folder (default ``<output.dir>/<name>/<timestamp>``).

    Returns:
        RunResult with ``.params`` (final flat parameters), ``.metrics`` and ``.run_dir``.

    Raises:
        ScenarioError: invalid scenario or missing data; nothing is written then.
    """
    loaded = load_scenario(source, overrides)
    fed = load_data(loaded)
    preflight(loaded, fed)  # everything that can fail before round 0, before the folder exists
    run_dir = new_run_dir(loaded.scenario, out)
    runner = _runner(loaded, run_dir, fed)
    runner.write_static_files()
    runner.write_summary("running")
    return runner.execute()


def resume(run_dir: str | Path) -> RunResult:
    """Continue a run from its newest checkpoint (same final model as an uninterrupted run).

    A checkpoint that cannot be read is skipped with a warning naming it, and the run goes on
    from the previous good one (the same final model, some rounds recomputed); metrics.jsonl
    is rewritten from the checkpoint, which also repairs a torn last line. A finished run
    whose final_model.pt is missing gets it back from its final checkpoint.

    Raises:
        FedflatError: not a run folder; scenario.yaml unreadable, invalid or changed since
            the checkpoint (the message names the keys); checkpoints present but none
            readable; summary.json unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedflatError(f"run folder {run_dir} does not exist")
    if not (run_dir / "scenario.yaml").is_file():
        raise FedflatError(f"{run_dir} is not a run folder (no scenario.yaml)")
    loaded = load_scenario(run_dir / "scenario.yaml")
    latest = latest_checkpoint(run_dir)
    for path, why in latest.skipped:
        fallback = latest.path.name if latest.path is not None else "none left"
        print(f"warning: {path}: unreadable checkpoint ({why}); skipped (previous good "
              f"checkpoint: {fallback})", file=sys.stderr)
    if latest.state is None and latest.skipped:
        # Starting again from round 0 would silently discard the run's progress.
        raise FedflatError(f"{run_dir / 'checkpoints'}: no readable checkpoint; delete the "
                           "checkpoints folder to start the run over from round 0")
    ckpt = latest.state
    if ckpt is not None and isinstance(ckpt.get("scenario"), dict):
        changed = changed_keys(ckpt["scenario"], computed_keys(loaded.scenario))
        if changed:
            raise FedflatError(
                f"{run_dir / 'scenario.yaml'}: differs from the scenario {latest.path} was "
                f"written with ({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''});"
                " resuming would mix two scenarios: restore it, or start a new run")
    fed = load_data(loaded)
    runner = _runner(loaded, run_dir, fed)
    state = None
    if ckpt is not None:
        runner.next_round = int(ckpt["next_round"])
        runner.metrics = list(ckpt["metrics"])
        runner.initial = dict(ckpt.get("initial") or {})
        runner.elapsed_before = float(ckpt.get("wall_seconds", 0.0))
        state = ckpt["server"]
        runner.privacy_state = ckpt.get("privacy")
        if ckpt.get("async_state") is not None:
            runner.async_state = AsyncState.from_dict(ckpt["async_state"])
    final = run_dir / "final_model.pt"
    if runner.next_round >= loaded.scenario.server.rounds:
        summary = _read_summary(run_dir / "summary.json")
        if final.exists() and summary is not None and summary.get("status") == "completed":
            params = torch.load(final)
            bpath = run_dir / "final_buffers.pt"
            buffers = torch.load(bpath) if bpath.exists() else torch.zeros(0)
            return RunResult(params=params, metrics=runner.metrics, run_dir=run_dir,
                             summary=summary, buffers=buffers, initial=runner.initial)
        # Every round is done: executing the remaining zero rounds rewrites final_model.pt
        # and summary.json from the final checkpoint.
        missing = "final_model.pt is missing" if not final.exists() else "summary.json is stale"
        print(f"note: {run_dir}: {missing}; rewritten from {latest.path}", file=sys.stderr)
    preflight(loaded, fed)  # fails before the summary says "running" again
    runner.write_summary("running", resumed_from_round=runner.next_round)
    return runner.execute(backend_state=state)


def _read_summary(path: Path) -> dict[str, Any] | None:
    """summary.json as a dict, or None when missing or unreadable (it is rewritten then)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
