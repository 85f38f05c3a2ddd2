"""When a sweep may keep a run folder it finds instead of running it again.

A folder is kept when the scenario it stored, resolved again by the current schema (a block
added to the schema since is filled with its defaults), equals the scenario wanted now, up to
the keys that never change a number (``output.*``, ``data.data_dir``), and it was made by the
code revision running now (summary.json ``code_revision``): so a table never mixes code
versions or scenarios, and editing a sweep's base scenario reruns what it changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fedflat._version import code_revision
from fedflat.errors import FedflatError
from fedflat.scenario.loader import load_scenario


def normalised(stored: dict[str, Any]) -> dict[str, Any] | None:
    """A stored ``scenario.yaml`` resolved again by the current schema, or None when the
    current schema rejects it."""
    try:
        return load_scenario(stored).scenario.model_dump(mode="json")
    except (FedflatError, ValueError, TypeError):
        return None


def comparable(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the keys that do not change what a run computes."""
    out = json.loads(json.dumps(tree, sort_keys=True, default=str))
    out.pop("output", None)
    if isinstance(out.get("data"), dict):
        out["data"].pop("data_dir", None)
    return out


def _read(path: Path, parse: Any) -> Any:
    try:
        return parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None


def same_run(run_dir: str | Path, source: str | Path | dict[str, Any],
             overrides: dict[str, Any] | list[str] | None = None) -> bool:
    """Whether ``run_dir`` holds (part of) the run of ``source`` + ``overrides``, made by this
    code revision (a folder without summary.json yet, e.g. killed mid-run, is judged on its
    scenario alone)."""
    run_dir = Path(run_dir)
    stored = _read(run_dir / "scenario.yaml", yaml.safe_load)
    if not isinstance(stored, dict):
        return False
    summary = _read(run_dir / "summary.json", json.loads)
    if isinstance(summary, dict) and summary.get("code_revision") != code_revision():
        return False
    old = normalised(stored)
    if old is None:
        return False
    want = load_scenario(source, overrides).scenario.model_dump(mode="json")
    return comparable(old) == comparable(want)


def reusable(run_dir: str | Path, source: str | Path | dict[str, Any],
             overrides: dict[str, Any] | list[str] | None = None,
             statuses: tuple[str, ...] = ("completed",)) -> bool:
    """Whether ``run_dir`` holds a finished run (summary.json status in ``statuses``) of
    ``source`` + ``overrides`` made by this code revision (``same_run``)."""
    summary = _read(Path(run_dir) / "summary.json", json.loads)
    if not isinstance(summary, dict) or summary.get("status") not in statuses:
        return False
    return same_run(run_dir, source, overrides)
