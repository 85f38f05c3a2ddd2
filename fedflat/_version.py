"""The package version and the code revision a run was made with (their own module, so that
the runtime can read them without importing the package's front door, which imports the
runtime lazily)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def code_revision() -> str | None:
    """The git commit of the fedflat source this process runs, with ``-dirty`` when tracked
    files differ from it; None outside a git checkout (an installed wheel) or without git.

    Run folders record it (summary.json ``code_revision``) so that tables built from
    earlier runs can refuse to mix code versions.
    """
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None
