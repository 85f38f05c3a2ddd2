"""Reports over run folders: comparison tables, mean ± std over seeds, PNG plots.

``fedflat.report.tables`` needs no matplotlib; the plot functions import it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedflat.report.tables import (
    RunRecord,
    SeedGroup,
    aggregate_seeds,
    comparison_table,
    load_run,
    run_labels,
    run_row,
    seed_table,
)

if TYPE_CHECKING:
    from pathlib import Path


def plot_runs(run_dirs: Any, out_dir: Any, **kwargs: Any) -> list[Path]:
    """Overlay several runs' plots; see ``fedflat.report.plots.plot_runs``."""
    from fedflat.report.plots import plot_runs as _plot_runs

    return _plot_runs(run_dirs, out_dir, **kwargs)


def plot_run(run_dir: Any, **kwargs: Any) -> list[Path]:
    """Draw one run's plots into ``<run_dir>/plots``; see ``fedflat.report.plots.plot_run``."""
    from fedflat.report.plots import plot_run as _plot_run

    return _plot_run(run_dir, **kwargs)


__all__ = [
    "RunRecord",
    "SeedGroup",
    "aggregate_seeds",
    "comparison_table",
    "load_run",
    "plot_run",
    "plot_runs",
    "run_labels",
    "run_row",
    "seed_table",
]
