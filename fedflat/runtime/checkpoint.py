"""Checkpoints: the complete state of a run after a round, written atomically.

A checkpoint holds the server state (global model, server-pipeline state, per-client state,
broadcast), the metrics so far and the next round. Random streams are derived from
(seed, purpose, round, client), so the round index is their whole state.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

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


def load_latest(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint, or None."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = torch.load(path, weights_only=False)
        except Exception:
            continue
        if ckpt.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: checkpoint format {ckpt.get('format')} is not {FORMAT_VERSION}")
        return ckpt
    return None
