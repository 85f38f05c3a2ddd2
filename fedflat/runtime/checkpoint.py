"""Checkpoints: the complete state of a run after a round, written atomically.

A checkpoint holds the server state (global model, server-pipeline state, per-client state,
broadcast), the metrics so far and the next round. Random streams are derived from
(seed, purpose, round, client), so the round index is their whole state.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedflat.errors import FedflatError

FORMAT_VERSION = 1
_NAME = re.compile(r"round_(\d+)\.pt$")


def save_checkpoint(run_dir: Path, next_round: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/round_<next_round>.pt atomically and prune old ones."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{next_round:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"format": FORMAT_VERSION, "next_round": next_round, **state}, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.search(p.name)]
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))  # type: ignore[union-attr]


@dataclass
class Latest:
    """The newest readable checkpoint of a run folder and the newer ones that were not.

    ``skipped`` lists (file, reason) for each checkpoint newer than ``path`` that could not
    be read (truncated by a full disk, corrupted, hand-edited): a resume falls back to the
    previous good one, which gives the same final model, and says so.
    """

    path: Path | None
    state: dict[str, Any] | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def latest_checkpoint(run_dir: Path) -> Latest:
    """The newest checkpoint that loads, and the unreadable newer ones.

    Raises:
        FedflatError: the newest readable checkpoint has another format version.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = torch.load(path, weights_only=False)
        except Exception as exc:  # truncated zip, bad pickle, EOF: unreadable whatever the cause
            skipped.append((path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                            if str(exc) else type(exc).__name__))
            continue
        if not isinstance(ckpt, dict) or "next_round" not in ckpt:
            skipped.append((path, "not a fedflat checkpoint"))
            continue
        if ckpt.get("format") != FORMAT_VERSION:
            raise FedflatError(f"{path}: checkpoint format {ckpt.get('format')} is not "
                               f"{FORMAT_VERSION} (written by another fedflat version)")
        return Latest(path, ckpt, skipped)
    return Latest(None, None, skipped)


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None."""
    return latest_checkpoint(run_dir).state
