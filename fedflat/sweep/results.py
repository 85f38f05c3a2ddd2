"""A sweep's table: per grid point, mean ± std and a 95 % Student-t interval across seeds.

Per run (read from what the run wrote: metrics.jsonl, summary.json, privacy.json):

- final / best test accuracy: the last / largest evaluated ``test_accuracy``;
- rounds to target: rounds completed when ``test_accuracy`` first reached ``--target``
  (``round + 1`` of that record); a seed that never reached it is left out of the mean and
  the column says how many did;
- ε spent: the last user-level ε (``epsilon_user``), else the largest sample-level one
  (``epsilon_sample_max``), else privacy.json's;
- uplink bytes: the last ``bytes_up_total``; simulated seconds: the last ``sim_seconds``.

Only finished runs (completed, budget_exhausted) count; ``n`` says how many did.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fedflat.report.tables import (
    RunRecord,
    as_finite,
    format_bytes,
    last_value,
    load_run,
    render_table,
    training_rounds,
)
from fedflat.sweep.runner import FINISHED, read_index

#: The per-run quantities of the table: (key, column header, format).
QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("final_accuracy", "final acc", ".4f"),
    ("best_accuracy", "best acc", ".4f"),
    ("rounds_to_target", "rounds to target", ".1f"),
    ("epsilon", "ε", ".3g"),
    ("uplink_bytes", "uplink", "bytes"),
    ("sim_seconds", "sim s", ".1f"),
)


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (ddof 1) and a two-sided t interval of n values."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "std": self.std, "ci_low": self.ci_low,
                "ci_high": self.ci_high}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Stat:
    """``mean ± t_{(1+c)/2, n-1} · s / √n``; std and interval are None for n < 2, all None
    for n = 0."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Stat(0, None, None, None, None)
    mean = float(x.mean())
    if n < 2:
        return Stat(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half)


def _epsilon(record: RunRecord) -> float | None:
    for key in ("epsilon_user", "epsilon", "epsilon_sample_max"):
        x = last_value(record.metrics, key)
        if x is not None:
            return x
    try:
        ledger = json.loads((record.run_dir / "privacy.json").read_text())
    except (OSError, ValueError):
        return None
    user = ledger.get("user_level") or {}
    if as_finite(user.get("epsilon")) is not None:
        return float(user["epsilon"])
    per_client = (ledger.get("sample_level") or {}).get("epsilon_per_client") or []
    return max(per_client) if per_client else None


def run_values(record: RunRecord, target: float | None) -> dict[str, float | None]:
    """The table's per-run quantities (see the module docstring)."""
    accs = [(int(m.get("round", i)), x) for i, m in enumerate(training_rounds(record.metrics))
            if (x := as_finite(m.get("test_accuracy"))) is not None]
    reached = None
    if target is not None:
        reached = next((float(r + 1) for r, a in accs if a >= target), None)
    return {
        "final_accuracy": accs[-1][1] if accs else None,
        "best_accuracy": max(a for _, a in accs) if accs else None,
        "rounds_to_target": reached,
        "epsilon": _epsilon(record),
        "uplink_bytes": last_value(record.metrics, "bytes_up_total"),
        "sim_seconds": last_value(record.metrics, "sim_seconds"),
    }


def sweep_results(sweep_dir: str | Path, target: float | None = None) -> list[dict[str, Any]]:
    """One entry per grid point: label, overrides, the seeds counted, per-seed values and a
    ``Stat`` dict per quantity."""
    folder = Path(sweep_dir)
    index = read_index(folder)
    out = []
    for point in index["points"]:
        revisions: set[str] = set()
        seeds, per_seed, diverged = [], [], []
        for run in point["runs"]:
            run_dir = folder / run["dir"]
            try:
                record = load_run(run_dir)
            except Exception:  # not started or half written: not counted
                continue
            if record.summary.get("status") == "diverged":
                diverged.append(run["seed"])
            if record.summary.get("status") not in FINISHED:
                continue
            seeds.append(run["seed"])
            per_seed.append(run_values(record, target))
            revisions.add(record.summary.get("code_revision") or "unknown")
        entry: dict[str, Any] = {"index": point["index"], "label": point["label"],
                                 "overrides": point["overrides"], "seeds": seeds,
                                 "seeds_diverged": diverged,
                                 "runs_planned": len(point["runs"]), "values": per_seed}
        for key, _, _ in QUANTITIES:
            entry[key] = t_interval([v[key] for v in per_seed if v[key] is not None]).as_dict()
        entry["code_revisions"] = sorted(revisions)  # of the counted runs (summary.json)
        out.append(entry)
    return out


def mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sample sd`` of ``values`` × ``scale`` (a lone value without ± sd), the cell
    of the reproduction scripts' tables."""
    if len(values) == 1:
        return f"{values[0] * scale:.{digits}f}"
    return (f"{statistics.mean(values) * scale:.{digits}f} ± "
            f"{statistics.stdev(values) * scale:.{digits}f}")


def format_cell(s: dict[str, Any], spec: str) -> str:
    def f(v: float) -> str:
        return format_bytes(v) if spec == "bytes" else format(v, spec)

    if s["mean"] is None:
        return "–"
    if s["std"] is None:
        return f(s["mean"])
    return f"{f(s['mean'])} ± {f(s['std'])} [{f(s['ci_low'])}, {f(s['ci_high'])}]"


def markdown_table(results: list[dict[str, Any]], target: float | None) -> str:
    """Markdown: one row per point; cells ``mean ± std [95 % CI]``; columns nobody recorded
    are left out."""
    cols = [q for q in QUANTITIES if any(r[q[0]]["n"] for r in results)
            or (q[0] == "rounds_to_target" and target is not None)]
    header = ["point", "n", *[(f"rounds to {target:g}" if k == "rounds_to_target" else h)
                              for k, h, _ in cols]]
    rows = []
    for r in results:
        n = f"{len(r['seeds'])}/{r['runs_planned']}"
        if r.get("seeds_diverged"):
            n += f" ({len(r['seeds_diverged'])} diverged)"
        cells = [r["label"], n]
        for key, _, spec in cols:
            text = format_cell(r[key], spec)
            if key == "rounds_to_target":
                text += f" (reached {r[key]['n']}/{len(r['seeds'])})"
            cells.append(text)
        rows.append(cells)
    return render_table(header, rows, markdown=True, right=set(range(1, len(header))))


def csv_table(results: list[dict[str, Any]]) -> str:
    """CSV: point, its grid values, n, then mean/std/ci_low/ci_high/n per quantity."""
    keys = list(dict.fromkeys(k for r in results for k in r["overrides"]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", "label", *keys, "n",
                *[f"{q}_{s}" for q, _, _ in QUANTITIES for s in ("mean", "std", "ci_low",
                                                                 "ci_high", "n")]])
    for r in results:
        w.writerow([r["index"], r["label"], *[json.dumps(r["overrides"].get(k)) for k in keys],
                    len(r["seeds"]),
                    *["" if r[q][s] is None else repr(r[q][s]) for q, _, _ in QUANTITIES
                      for s in ("mean", "std", "ci_low", "ci_high", "n")]])
    return buf.getvalue()


def write_tables(sweep_dir: str | Path, target: float | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv``, ``results.json`` into the sweep folder."""
    folder = Path(sweep_dir)
    results = sweep_results(folder, target)
    paths = {"md": folder / "results.md", "csv": folder / "results.csv",
             "json": folder / "results.json"}
    note = ("Mean ± sample std [95 % Student-t CI] across seeds; n = finished runs / planned"
            " (diverged runs are not counted)."
            + (f" Rounds to target: rounds until test accuracy >= {target:g}." if target else ""))
    revisions = sorted({r for entry in results for r in entry["code_revisions"]})
    if len(revisions) > 1:
        note += (f" WARNING: the runs come from {len(revisions)} code revisions "
                 f"({', '.join(r[:12] for r in revisions)}); rerun them with one.")
    paths["md"].write_text(markdown_table(results, target) + "\n\n" + note + "\n")
    paths["csv"].write_text(csv_table(results))
    paths["json"].write_text(json.dumps({"target": target, "confidence": 0.95,
                                         "code_revisions": revisions, "points": results},
                                        indent=2) + "\n")
    return paths
