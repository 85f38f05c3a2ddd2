"""A sweep's plots: test accuracy against rounds, uplink bytes, simulated time and ε, one line
per grid point (the mean across seeds) with a band of ± one standard deviation.

Seeds are aligned by round: at each round that every counted seed evaluated, y is the mean
(band: ± std) and x the mean x across seeds (bytes, time and ε can differ a little between
seeds). Drawn on a bare ``Figure`` with the Agg canvas, like ``fedflat.report.plots``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedflat.report.plots import (
    BYTE_UNITS,
    DPI,
    FIGSIZE,
    MARKER_MAX_POINTS,
    TIME_UNITS,
    display_unit,
    metric_column,
)
from fedflat.report.tables import load_run
from fedflat.sweep.runner import FINISHED, read_index

#: (file stem, x key, x label); ``epsilon`` takes the first ε key a run has.
SWEEP_PLOTS: tuple[tuple[str, str, str], ...] = (
    ("accuracy_vs_round", "round", "round"),
    ("accuracy_vs_uplink_bytes", "bytes_up_total", "cumulative uplink"),
    ("accuracy_vs_sim_time", "sim_seconds", "simulated time"),
    ("accuracy_vs_epsilon", "epsilon", "ε spent"),
)
_EPS_KEYS = ("epsilon_user", "epsilon", "epsilon_sample_max")


def _point_series(runs: list[list[dict]], x_key: str) -> tuple[np.ndarray, ...] | None:
    """(x mean, y mean, y std) over the rounds where every seed has x and y."""
    xs, ys = [], []
    for metrics in runs:
        if x_key == "epsilon":
            key = next((k for k in _EPS_KEYS if np.isfinite(metric_column(metrics, k)).any()), None)
            if key is None:
                return None
            x = metric_column(metrics, key)
        else:
            x = metric_column(metrics, x_key)
        xs.append(x)
        ys.append(metric_column(metrics, "test_accuracy"))
    n = min(len(x) for x in xs)
    x = np.stack([a[:n] for a in xs])
    y = np.stack([a[:n] for a in ys])
    keep = np.isfinite(x).all(axis=0) & np.isfinite(y).all(axis=0)
    if not keep.any():
        return None
    x, y = x[:, keep], y[:, keep]
    std = y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1])
    return x.mean(axis=0), y.mean(axis=0), std


def draw_sweep_plots(sweep_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the figures of ``SWEEP_PLOTS`` that have data into ``<sweep>/plots/``."""
    folder = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else folder / "plots"
    points = []
    for point in read_index(folder)["points"]:
        runs = []
        for run in point["runs"]:
            try:
                rec = load_run(folder / run["dir"])
            except Exception:  # not started or half written
                continue
            if rec.summary.get("status") in FINISHED:
                runs.append(rec.metrics)
        if runs:
            points.append((point["label"], runs))
    written = []
    for stem, x_key, xlabel in SWEEP_PLOTS:
        series = [(label, s) for label, runs in points
                  if (s := _point_series(runs, x_key)) is not None]
        if not series:
            continue
        fig = Figure(figsize=FIGSIZE, dpi=DPI)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x_max = max(float(s[0].max()) for _, s in series)
        scale, label_x = 1.0, xlabel
        if x_key == "bytes_up_total":
            unit, scale = display_unit(x_max, BYTE_UNITS)
            label_x = f"{xlabel} ({unit})"
        elif x_key == "sim_seconds":
            unit, scale = display_unit(x_max, TIME_UNITS)
            label_x = f"{xlabel} ({unit})"
        for label, (x, y, sd) in series:
            style = {"marker": "o", "markersize": 3} if len(x) <= MARKER_MAX_POINTS else {}
            (line,) = ax.plot(x / scale, y, label=label, linewidth=1.4, **style)
            ax.fill_between(x / scale, y - sd, y + sd, color=line.get_color(), alpha=0.2,
                            linewidth=0)
        ax.set_xlabel(label_x)
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.grid(True, alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small", loc="best")
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.96)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.png"
        fig.savefig(path, format="png")
        written.append(path)
    return written
