"""PNG plots of one run or several overlaid: accuracy against rounds, simulated time and
bytes on the wire; client and global training loss, test loss, ε and λ_max against rounds.
The initial model's evaluation (round -1) starts the lines that it has a value for.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, so nothing
touches ``pyplot``'s global state or the caller's backend, and no display is needed.
A plot whose x- or y-metric no run recorded is skipped; a run that lacks it is left out
of that plot. Rounds where a metric is null (not evaluated, NaN) are left out of its line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedflat.errors import FedflatError
from fedflat.report.tables import (
    EPSILON_KEYS,
    RunRecord,
    load_run,
    read_mapping,
    read_metrics,
    run_labels,
)


@dataclass(frozen=True)
class PlotSpec:
    """One figure: ``y`` against ``x``, saved as ``<stem>.png``.

    ``x`` is a per-round key, or ``"bytes"`` for cumulative uplink + downlink bytes.
    ``y`` lists per-round keys in order of preference (the first one a run has is used).
    """

    stem: str
    x: str
    y: tuple[str, ...]
    ylabel: str


#: The figures ``plot_runs`` and ``plot_run`` draw, in order.
PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("test_accuracy_vs_round", "round", ("test_accuracy",), "test accuracy"),
    PlotSpec("test_accuracy_vs_sim_time", "sim_seconds", ("test_accuracy",), "test accuracy"),
    PlotSpec("test_accuracy_vs_bytes", "bytes", ("test_accuracy",), "test accuracy"),
    # Two different training losses, named apart: the cohort's own mini-batch loss during
    # local training (every round; "train_loss" in folders written before the split), and
    # the global model's loss on the pooled train split (evaluated rounds, eval.split).
    PlotSpec("client_train_loss_vs_round", "round", ("client_train_loss", "train_loss"),
             "client train loss (cohort's local mini-batches)"),
    PlotSpec("global_train_loss_vs_round", "round", ("global_train_loss",),
             "global train loss (global model, pooled train split)"),
    PlotSpec("test_loss_vs_round", "round", ("test_loss",), "test loss"),
    PlotSpec("epsilon_vs_round", "round", EPSILON_KEYS, "ε (user level)"),
    PlotSpec("lambda_max_vs_round", "round", ("lambda_max",), "Hessian λ_max"),
)

#: eval.per_client figures, drawn after ``PLOTS`` when a run has them (with the
#: distribution of the final per-client accuracies, per_client_accuracy_hist.png).
FAIRNESS_PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("per_client_worst10_vs_round", "round", ("per_client/accuracy_worst10",),
             "worst-10 % client accuracy"),
)

PER_CLIENT_FILE = "per_client.jsonl"  # eval.per_client rows (round, client_id, n, accuracy, ...)

FIGSIZE = (6.4, 4.0)
DPI = 100
MARKER_MAX_POINTS = 40  # draw markers on sparse lines (e.g. evaluated every 10 rounds)


# ---------------------------------------------------------------------------- series
def metric_column(metrics: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    """The per-round values of ``key`` as float64, NaN where absent or not a number."""
    out = np.full(len(metrics), np.nan)
    for i, rec in enumerate(metrics):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _cumulative(
    metrics: Sequence[dict[str, Any]], total_key: str, round_key: str
) -> np.ndarray | None:
    """Cumulative bytes of one direction: the ``*_total`` key, else the running sum of
    the per-round key (a round without it adds 0); None if neither is recorded."""
    total = metric_column(metrics, total_key)
    if np.isfinite(total).any():
        return total
    per_round = metric_column(metrics, round_key)
    if np.isfinite(per_round).any():
        return np.cumsum(np.nan_to_num(per_round, nan=0.0))
    return None


def _x_values(metrics: Sequence[dict[str, Any]], x: str) -> np.ndarray | None:
    """The x-axis values per round, or None when the run did not record them."""
    if not metrics:
        return None
    if x == "bytes":
        up = _cumulative(metrics, "bytes_up_total", "bytes_up")
        down = _cumulative(metrics, "bytes_down_total", "bytes_down")
        if up is None and down is None:
            return None
        zero = np.zeros(len(metrics))
        return (zero if up is None else up) + (zero if down is None else down)
    col = metric_column(metrics, x)
    if x == "round" and not np.isfinite(col).any():
        return np.arange(len(metrics), dtype=np.float64)  # records without "round": file order
    return col if np.isfinite(col).any() else None


def _series(record: RunRecord, spec: PlotSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) of one run for one figure, rows with a missing x or y dropped."""
    xs = _x_values(record.metrics, spec.x)
    if xs is None:
        return None
    for key in spec.y:
        ys = metric_column(record.metrics, key)
        keep = np.isfinite(xs) & np.isfinite(ys)
        if keep.any():
            return xs[keep], ys[keep]
    return None


# ---------------------------------------------------------------------------- axes
def display_unit(max_value: float, units: Sequence[tuple[str, float]]) -> tuple[str, float]:
    """The largest unit not larger than ``max_value`` (the last one if none)."""
    for name, scale in units:
        if max_value >= scale:
            return name, scale
    return units[-1]


BYTE_UNITS = (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))
TIME_UNITS = (("h", 3600.0), ("min", 60.0), ("s", 1.0))


def _draw(
    spec: PlotSpec,
    series: list[tuple[str, np.ndarray, np.ndarray]],
    title: str | None,
    path: Path,
) -> None:
    """Draw one figure (one line per (label, x, y)) and save it as PNG."""
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x_max = max(float(np.max(x)) for _, x, _ in series)
    if spec.x == "bytes":
        unit, scale = display_unit(x_max, BYTE_UNITS)
        xlabel = f"cumulative uplink + downlink ({unit})"
        finals = [float(x[-1]) for _, x, _ in series if x[-1] > 0]
        # Compressed and uncompressed runs can differ 100x in bytes: a log axis keeps both readable.
        if len(finals) > 1 and max(finals) / min(finals) > 30:
            ax.set_xscale("log")
    elif spec.x == "sim_seconds":
        unit, scale = display_unit(x_max, TIME_UNITS)
        xlabel = f"simulated time ({unit})"
    else:
        scale, xlabel = 1.0, spec.x
    for label, x, y in series:
        style = {"marker": "o", "markersize": 3} if len(x) <= MARKER_MAX_POINTS else {}
        ax.plot(x / scale, y, label=label, linewidth=1.4, **style)
    ys = np.concatenate([y for _, _, y in series])
    # A diverging loss would flatten every other line: switch to log when the range is huge.
    if "loss" in spec.stem and (ys > 0).all() and ys.max() / ys.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(spec.ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small", loc="best")
    # Fixed margins: tight_layout would measure every tick label and cost ~40 % of the time.
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91 if title else 0.96)
    fig.savefig(path, format="png")


def _as_record(item: str | Path | RunRecord) -> RunRecord:
    return item if isinstance(item, RunRecord) else load_run(item)


def draw_plots(
    records: Sequence[RunRecord],
    out_dir: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    extra: Sequence[str] = (),
) -> list[Path]:
    """Draw every figure of ``PLOTS`` (plus ``extra`` keys against round) that has data.

    Args:
        records: the runs to overlay.
        out_dir: where the PNGs go (created if needed).
        labels: legend labels (default ``run_labels(records)``).
        title: figure title (default none).
        extra: further per-round keys to plot against the round.

    Returns:
        The written PNG paths, in ``PLOTS`` order then ``extra`` order.
    """
    labels = list(run_labels(records)) if labels is None else list(labels)
    if len(labels) != len(records):
        raise ValueError(f"labels must have one entry per run ({len(records)}), got {len(labels)}")
    out = Path(out_dir)
    specs = [*PLOTS, *FAIRNESS_PLOTS,
             *(PlotSpec(f"{k}_vs_round", "round", (k,), k) for k in extra)]
    written: list[Path] = []
    for spec in specs:
        series = []
        for label, rec in zip(labels, records, strict=True):
            s = _series(rec, spec)
            if s is not None:
                series.append((label, *s))
        if not series:
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{spec.stem}.png"
        _draw(spec, series, title, path)
        written.append(path)
    dist = _per_client_distribution(records, labels, title, out)
    if dist is not None:
        written.append(dist)
    return written


def read_per_client(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's per_client.jsonl (empty when eval.per_client was off)."""
    path = Path(run_dir) / PER_CLIENT_FILE
    return read_metrics(path) if path.is_file() else []


def final_per_client(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-client rows of the last evaluated round, clients with test data only."""
    rows = read_per_client(run_dir)
    if not rows:
        return []
    last = max(r["round"] for r in rows)
    return [r for r in rows if r["round"] == last and r.get("n") and r.get("accuracy") is not None]


def _per_client_distribution(records: Sequence[RunRecord], labels: Sequence[str],
                             title: str | None, out: Path) -> Path | None:
    """Histogram of the final round's per-client accuracy (global model; each client's
    own local model dashed where recorded), one outline per run."""
    finals = [(label, final_per_client(r.run_dir)) for label, r in zip(labels, records,
                                                                          strict=True)]
    finals = [(label, rows) for label, rows in finals if rows]
    if not finals:
        return None
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    for i, (label, rows) in enumerate(finals):
        color = f"C{i % 10}"
        ax.hist([r["accuracy"] for r in rows], bins=bins, histtype="step", linewidth=1.6,
                color=color, label=f"{label} (global)" if len(finals) > 1 else "global model")
        local = [r["local_accuracy"] for r in rows if r.get("local_accuracy") is not None]
        if local:
            ax.hist(local, bins=bins, histtype="step", linestyle="--", linewidth=1.2,
                    color=color, label=f"{label} (local)" if len(finals) > 1 else "local models")
    ax.set_xlabel("client test accuracy (final evaluation)")
    ax.set_ylabel("clients")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.91 if title else 0.96)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "per_client_accuracy_hist.png"
    fig.savefig(path, format="png")
    return path


def plot_runs(
    run_dirs: Sequence[str | Path | RunRecord],
    out_dir: str | Path,
    *,
    extra: Sequence[str] = (),
) -> list[Path]:
    """Overlay several runs, one line per run, labelled by name (plus the folder name
    where names collide).

    Args:
        run_dirs: run folders, or records from ``load_run``.
        out_dir: where the PNGs go (created if needed).
        extra: further per-round keys to plot against the round.

    Returns:
        The PNG files written; a figure no run has data for is not drawn.

    Raises:
        FedflatError: a folder is not a run (the message names the missing file).
    """
    records = [_as_record(d) for d in run_dirs]
    return draw_plots(records, out_dir, extra=extra)


def plot_run(run_dir: str | Path, *, extra: Sequence[str] = ()) -> list[Path]:
    """Draw the plots of one run into ``<run_dir>/plots/``.

    Only ``metrics.jsonl`` is needed; ``summary.json`` and ``scenario.yaml`` give the
    title when present, so the runtime can call this before or after writing the summary.
    Missing per-round metrics only skip figures.

    Args:
        run_dir: the run folder.
        extra: further per-round keys to plot against the round.

    Returns:
        The PNG files written.

    Raises:
        FedflatError: ``run_dir`` does not exist or has no ``metrics.jsonl``.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FedflatError(f"run folder {path} does not exist")
    metrics = read_metrics(path / "metrics.jsonl")
    # The summary and scenario only name the run: one not written yet is no error.
    optional = {}
    for fname, kind in (("summary.json", "json"), ("scenario.yaml", "yaml")):
        try:
            optional[fname] = read_mapping(path / fname, kind=kind)
        except FedflatError:
            optional[fname] = {}
    record = RunRecord(run_dir=path, scenario=optional["scenario.yaml"], metrics=metrics,
                       summary=optional["summary.json"])
    name = record.name
    return draw_plots([record], path / "plots", labels=[name], title=name, extra=extra)
