"""``fedflat report ... --html report.html``: one self-contained static page.

The page holds the comparison table, for a sweep folder its results table (mean ± std and
95 % CI across seeds), every plot (PNG embedded as base64, so the file can be mailed or
opened offline), per-client fairness summaries, each run's privacy ledger summary and its
resolved scenario. No scripts, no external resources.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fedflat
from fedflat.errors import FedflatError
from fedflat.report.tables import (
    RunRecord,
    expand_run_dirs,
    format_bytes,
    load_run,
    run_labels,
    run_row,
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}
.plots img{width:480px;border:1px solid #eee}figcaption{font-size:.8em;color:#555}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:.8em;max-height:30em}
.meta{color:#666;font-size:.85em}
"""

_RUN_COLUMNS: tuple[tuple[str, str, str | None], ...] = (
    ("run", "name", None), ("status", "status", None), ("rounds", "rounds", "d"),
    ("final acc", "final_accuracy", ".4f"), ("best acc", "best_accuracy", ".4f"),
    ("test loss", "final_test_loss", ".4f"), ("wall s", "wall_seconds", ".1f"),
    ("sim s", "sim_seconds", ".1f"), ("bytes", "total_bytes", "bytes"), ("ε", "epsilon", ".3g"),
)
_FAIRNESS = (("mean", "accuracy_mean"), ("std", "accuracy_std"),
             ("worst 10 %", "accuracy_worst10"), ("best 10 %", "accuracy_best10"),
             ("Gini", "accuracy_gini"), ("local mean", "local_accuracy_mean"),
             ("local worst 10 %", "local_accuracy_worst10"))


def collect(paths: Sequence[str | Path]) -> tuple[list[RunRecord], list[Path]]:
    """(run records, sweep folders) named by ``paths``: a sweep folder (with sweep.json)
    stands for its runs; other paths as ``expand_run_dirs``. Runs not started are skipped
    in a sweep."""
    sweeps, plain = [], []
    for raw in paths:
        p = Path(raw)
        if (p / "sweep.json").is_file():
            sweeps.append(p)
        else:
            plain.append(p)
    records = [load_run(d) for d in expand_run_dirs(plain)]
    for sw in sweeps:
        runs = sw / "runs"
        dirs = expand_run_dirs([runs]) if runs.is_dir() else []
        records += [load_run(d) for d in dirs if d != runs]
    if not records:
        raise FedflatError("no run folders given")
    return records, sweeps


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v: Any, spec: str | None) -> str:
    if spec is None:
        return _esc(v)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format_bytes(v) if spec == "bytes" else format(v, spec)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def runs_table(records: Sequence[RunRecord]) -> str:
    """The comparison table (columns no run recorded are left out)."""
    rows = [run_row(r) for r in records]
    cols = [c for c in _RUN_COLUMNS
            if c[2] is None or c[1] in ("rounds", "final_accuracy", "best_accuracy")
            or any(r[c[1]] is not None for r in rows)]
    cells = [[_fmt(label if key == "name" else row[key], spec) for _, key, spec in cols]
             for label, row in zip(run_labels(records), rows, strict=True)]
    return _table([c[0] for c in cols], cells, "runs")


def sweep_table(sweep_dir: Path) -> str:
    """A sweep's results: mean ± std [95 % CI] per grid point and quantity."""
    from fedflat.sweep.results import QUANTITIES, format_cell, sweep_results
    from fedflat.sweep.runner import read_index

    target = read_index(sweep_dir).get("target")
    results = sweep_results(sweep_dir, target)
    cols = [q for q in QUANTITIES if any(r[q[0]]["n"] for r in results)]
    rows = [[_esc(r["label"]), f"{len(r['seeds'])}/{r['runs_planned']}",
             *[_esc(format_cell(r[k], spec)) for k, _, spec in cols]] for r in results]
    return _table(["point", "n", *[h for _, h, _ in cols]], rows, "sweep")


def _last(metrics: Sequence[dict[str, Any]], key: str) -> float | None:
    for m in reversed(metrics):
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def fairness_table(records: Sequence[RunRecord]) -> str | None:
    """Final per-client summaries of the runs that evaluated per client (eval.per_client)."""
    rows = []
    for label, r in zip(run_labels(records), records, strict=True):
        vals = [_last(r.metrics, "per_client/" + k) for _, k in _FAIRNESS]
        if vals[0] is None:
            continue
        n = _last(r.metrics, "per_client/local_clients")
        rows.append([_esc(label), *[_fmt(v, ".4f") for v in vals],
                     "–" if n is None else str(int(n))])
    if not rows:
        return None
    return _table(["run", *[h for h, _ in _FAIRNESS], "clients with a local model"], rows,
                  "fairness")


def privacy_table(records: Sequence[RunRecord]) -> str | None:
    """Each private run's ledger summary (privacy.json)."""
    rows = []
    for label, r in zip(run_labels(records), records, strict=True):
        path = r.run_dir / "privacy.json"
        if not path.is_file():
            continue
        led = json.loads(path.read_text())
        u, s = led.get("user_level") or {}, led.get("sample_level") or {}
        per = s.get("epsilon_per_client") or []
        rows.append([_esc(label), _esc(led.get("accountant", "")),
                     _fmt(u.get("epsilon"), ".4g"), _fmt(u.get("epsilon_budget"), ".4g"),
                     _fmt(u.get("noise_multiplier"), ".4g"), _fmt(u.get("delta"), ".2g"),
                     _esc(s.get("mechanism", "–")), _fmt(max(per) if per else None, ".4g"),
                     _fmt(s.get("epsilon_budget"), ".4g"), _fmt(s.get("noise_multiplier"), ".4g"),
                     _esc("; ".join(led.get("notes") or []))])
    if not rows:
        return None
    return _table(["run", "accountant", "user ε", "user budget", "user σ", "user δ",
                   "sample mechanism", "sample ε (max client)", "sample budget", "sample σ",
                   "notes"], rows, "privacy")


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_esc(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_esc(path.stem.replace('_', ' '))}</figcaption></figure>")


def render(records: Sequence[RunRecord], sweeps: Sequence[Path] = (),
           title: str = "fedflat report") -> str:
    """The whole page as a string (plots drawn into a temporary folder and embedded)."""
    from fedflat.report.plots import draw_plots

    parts = [f"<h1>{_esc(title)}</h1>",
             f'<p class="meta">{len(records)} runs · fedflat {_esc(fedflat.__version__)} · '
             f"generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}</p>",
             "<h2>Runs</h2>", runs_table(records)]
    with tempfile.TemporaryDirectory() as tmp:
        for sw in sweeps:
            from fedflat.sweep.plots import draw_sweep_plots

            parts += [f"<h2>Sweep {_esc(sw.name)}</h2>",
                      "<p>mean ± sample std [95 % Student-t CI] across seeds; "
                      "n = finished runs / planned</p>", sweep_table(sw)]
            pngs = draw_sweep_plots(sw, Path(tmp) / f"sweep-{sw.name}")
            if pngs:
                parts.append('<div class="plots">' + "".join(_img(p) for p in pngs) + "</div>")
        pngs = draw_plots(records, Path(tmp) / "runs")
        parts += ["<h2>Plots</h2>",
                  '<div class="plots">' + "".join(_img(p) for p in pngs) + "</div>"
                  if pngs else "<p>No per-round metrics yet.</p>"]
    fair = fairness_table(records)
    if fair is not None:
        parts += ["<h2>Per-client fairness (last evaluation)</h2>",
                  "<p>Accuracy of the global model on each client's own test split; "
                  "local = each client's own model after its last participation.</p>", fair]
    priv = privacy_table(records)
    if priv is not None:
        parts += ["<h2>Privacy ledger</h2>", priv]
    parts.append("<h2>Resolved scenarios</h2>")
    for label, r in zip(run_labels(records), records, strict=True):
        text = (r.run_dir / "scenario.yaml").read_text()
        parts.append(f"<details><summary>{_esc(label)} <code>{_esc(r.run_dir)}</code></summary>"
                     f"<pre>{_esc(text)}</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def write_html(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the report of the runs / sweep folders ``paths`` to ``out``; returns it."""
    records, sweeps = collect(paths)
    out = Path(out)
    if out.is_dir():
        raise FedflatError(f"--html {out} is a folder; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(render(records, sweeps), encoding="utf-8")
    tmp.replace(out)
    return out
