"""Read run folders and compare them: one row per run, and mean ± std over seeds.

A run folder (written by ``fedflat.runtime.run``) holds ``scenario.yaml`` (the resolved
scenario), ``metrics.jsonl`` (the initial model's line, ``round`` -1, then one JSON object
per round), ``summary.json`` and
``clients.json``. Only the first three are read here. Per-round keys other than ``round``
are optional: a column or statistic whose key no run has is left out, never required.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedflat.errors import FedflatError

#: The files ``load_run`` needs; ``clients.json`` is not read by the report.
RUN_FILES: tuple[str, ...] = ("scenario.yaml", "metrics.jsonl", "summary.json")

#: ``round`` of the first metrics line, the initial model's evaluation: training rounds are
#: indexed from 0 everywhere (RNG streams, availability traces, lr decay, SWA) and line t
#: holds the model after round t, so the model before round 0 is line -1.
INITIAL_ROUND = -1

#: Per-round keys holding the user-level privacy loss, in order of preference.
EPSILON_KEYS: tuple[str, ...] = ("epsilon_user", "epsilon")

#: Scenario keys (dotted) that do not change what a run computes: the root seed (which
#: ``aggregate_seeds`` averages over) and where and how the run is written.
SEED_INDEPENDENT_KEYS: tuple[str, ...] = ("seed", "output")


@dataclass(frozen=True)
class RunRecord:
    """One run folder, read.

    Attributes:
        run_dir: the folder.
        scenario: the resolved scenario (``scenario.yaml``) as a dict.
        metrics: the per-round records (``metrics.jsonl``), in file order.
        summary: ``summary.json`` as a dict.
        torn_line: the line number of a torn last line of ``metrics.jsonl`` that was
            dropped (a run killed mid-write, or one still writing), else None.
    """

    run_dir: Path
    scenario: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    torn_line: int | None = None

    @property
    def name(self) -> str:
        """The run name: summary, then scenario, then the folder name."""
        name = self.summary.get("name") or self.scenario.get("name")
        return str(name) if name else self.run_dir.name


@dataclass(frozen=True)
class SeedGroup:
    """Runs whose resolved scenarios differ only in the seed (and output settings).

    Attributes:
        label: the scenario name, with ``#k`` appended when two groups share a name.
        records: the runs, sorted by seed.
        seeds: their seeds, sorted.
        final_accuracies: each run's final test accuracy (``nan`` where none was measured).
        final_mean: mean over the runs that have a final accuracy (``nan`` if none).
        final_std: standard deviation with ``ddof`` (``nan`` for fewer than ddof + 1 runs).
        best_mean: mean of the best test accuracies.
        best_std: their standard deviation with ``ddof``.
        ddof: the delta degrees of freedom used (1: sample standard deviation).
    """

    label: str
    records: tuple[RunRecord, ...]
    seeds: tuple[int, ...]
    final_accuracies: tuple[float, ...]
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    ddof: int

    @property
    def n_measured(self) -> int:
        """How many runs have a final accuracy (those the mean is over)."""
        return sum(math.isfinite(a) for a in self.final_accuracies)


# ---------------------------------------------------------------------------- reading
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (see ``read_metrics_torn``)."""
    return read_metrics_torn(path)[0]


def read_metrics_torn(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """Read a ``metrics.jsonl`` file; also the number of a torn last line, dropped.

    A last line without its newline that does not parse is a record still being written
    (the run is in progress or was killed mid-write) and is dropped; any other bad line
    raises.

    Args:
        path: the file.

    Returns:
        The records in file order, and the torn last line's number (None if none).

    Raises:
        FedflatError: the file is missing or a complete line is not a JSON object.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FedflatError(f"{path.parent} is not a run folder: {path.name} is missing") from None
    except OSError as exc:
        raise FedflatError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):  # no newline after it: a partly written last record
                return records, i
            raise FedflatError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise FedflatError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records, None


def read_mapping(path: Path, *, kind: str) -> dict[str, Any]:
    """Read a YAML (``kind="yaml"``) or JSON file that must hold a mapping.

    Raises:
        FedflatError: the file is missing (named), unreadable, malformed or not a mapping.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FedflatError(f"{path.parent} is not a run folder: {path.name} is missing") from None
    except OSError as exc:
        raise FedflatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        obj = yaml.safe_load(text) if kind == "yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise FedflatError(f"{path}: not valid {kind.upper()} ({exc})") from None
    if obj is None:
        obj = {}
    if not isinstance(obj, dict):
        raise FedflatError(f"{path}: expected a mapping, got {type(obj).__name__}")
    return obj


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a run folder.

    Args:
        run_dir: a folder written by ``fedflat run``.

    Returns:
        The scenario, metrics and summary of the run.

    Raises:
        FedflatError: the folder does not exist, or lacks one of ``RUN_FILES`` (the message
            names it), or a file does not parse.
    """
    path = Path(run_dir)
    if not path.exists():
        raise FedflatError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise FedflatError(f"{path} is not a folder (expected a run folder)")
    missing = [f for f in RUN_FILES if not (path / f).is_file()]
    if missing:
        raise FedflatError(f"{path} is not a run folder: {', '.join(missing)} missing")
    metrics, torn = read_metrics_torn(path / "metrics.jsonl")
    return RunRecord(
        run_dir=path,
        scenario=read_mapping(path / "scenario.yaml", kind="yaml"),
        metrics=metrics,
        summary=read_mapping(path / "summary.json", kind="json"),
        torn_line=torn,
    )


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds every file of ``RUN_FILES``."""
    p = Path(path)
    return all((p / f).is_file() for f in RUN_FILES)


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders named by ``paths``: a run folder stands for itself; a folder that is
    not a run but has run folders directly inside (``runs/<name>/``) stands for them,
    sorted by name. Anything else is kept as given, so ``load_run`` names what is missing.
    """
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not is_run_dir(p):
            children = sorted(c for c in p.iterdir() if c.is_dir() and is_run_dir(c))
            if children:
                out.extend(children)
                continue
        out.append(p)
    return out


# ---------------------------------------------------------------------------- values
def as_finite(v: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, strings, bools)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    x = float(v)
    return x if math.isfinite(x) else None


def last_value(metrics: Sequence[dict[str, Any]], key: str) -> float | None:
    """The last finite value of ``key`` over the rounds, or None."""
    for rec in reversed(metrics):
        x = as_finite(rec.get(key))
        if x is not None:
            return x
    return None


def total_bytes(metrics: Sequence[dict[str, Any]]) -> float | None:
    """Cumulative uplink + downlink bytes at the last round, or None if not recorded.

    Uses ``bytes_up_total``/``bytes_down_total`` when present, else the sum of the
    per-round ``bytes_up``/``bytes_down``; a direction nobody recorded counts as 0.
    """
    total, found = 0.0, False
    for cum_key, round_key in (("bytes_up_total", "bytes_up"), ("bytes_down_total", "bytes_down")):
        cum = last_value(metrics, cum_key)
        if cum is not None:
            total, found = total + cum, True
            continue
        per_round = [x for x in (as_finite(r.get(round_key)) for r in metrics) if x is not None]
        if per_round:
            total, found = total + math.fsum(per_round), True
    return total if found else None


def _epsilon(record: RunRecord) -> float | None:
    for key in EPSILON_KEYS:
        x = last_value(record.metrics, key)
        if x is None:
            x = as_finite(record.summary.get(key))
        if x is not None:
            return x
    return None


def training_rounds(metrics: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of training rounds: all but the initial model's evaluation."""
    return [m for m in metrics if m.get("round") != INITIAL_ROUND]


def accuracies(record: RunRecord) -> tuple[float | None, float | None]:
    """(final, best) test accuracy over the training rounds (as ``summary.json``), from the
    metrics, else from ``summary.json``."""
    accs = [x for x in (as_finite(m.get("test_accuracy"))
                        for m in training_rounds(record.metrics)) if x is not None]
    if accs:
        return accs[-1], max(accs)
    s = record.summary
    return as_finite(s.get("final_test_accuracy")), as_finite(s.get("best_test_accuracy"))


def run_labels(records: Sequence[RunRecord]) -> list[str]:
    """A legend label per run: its name, plus ``(folder)`` where names collide.

    The suffix is the shortest tail of the folder path that tells the colliding runs
    apart (``stamp``, then ``parent/stamp``, ...), or ``#i`` if even full paths collide.
    """
    names = [r.name for r in records]
    labels = list(names)
    for name in set(names):
        idx = [i for i, n in enumerate(names) if n == name]
        if len(idx) < 2:
            continue
        parts = [records[i].run_dir.resolve().parts for i in idx]
        longest = max(len(p) for p in parts)
        for depth in range(1, longest + 1):
            tails = ["/".join(p[-depth:]) for p in parts]
            if len(set(tails)) == len(tails):
                for i, tail in zip(idx, tails, strict=True):
                    labels[i] = f"{name} ({tail})"
                break
        else:
            for k, i in enumerate(idx):
                labels[i] = f"{name} #{k + 1}"
    return labels


def run_row(record: RunRecord) -> dict[str, Any]:
    """The numbers of one table row (None where not recorded).

    Keys: name, status, rounds, final_accuracy, best_accuracy, final_test_loss,
    wall_seconds, sim_seconds, total_bytes, epsilon.
    """
    s, m = record.summary, record.metrics
    final, best = accuracies(record)
    status = str(s.get("status", "unknown"))
    trained = training_rounds(m)
    rounds = len(trained) if trained else as_finite(s.get("rounds_completed"))
    # While a run is going its summary is the one written at the start; the last
    # metrics line is fresher.
    wall = as_finite(s.get("wall_seconds"))
    latest = last_value(m, "wall_seconds")
    if latest is not None and (status == "running" or wall is None):
        wall = latest
    loss = last_value(m, "test_loss")
    return {
        "name": record.name,
        "status": status,
        "rounds": None if rounds is None else int(rounds),
        "final_accuracy": final,
        "best_accuracy": best,
        "final_test_loss": loss if loss is not None else as_finite(s.get("final_test_loss")),
        "wall_seconds": wall,
        "sim_seconds": last_value(m, "sim_seconds"),
        "total_bytes": total_bytes(m),
        "epsilon": _epsilon(record),
    }


# ---------------------------------------------------------------------------- formatting
def format_bytes(n: float) -> str:
    """Decimal units, 3 significant digits: ``1.50 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def render_table(header: list[str], rows: list[list[str]], *, markdown: bool,
                 right: set[int]) -> str:
    """Aligned plain text, or a GitHub-flavoured Markdown table."""
    widths = [max([len(h), *(len(r[j]) for r in rows)]) for j, h in enumerate(header)]

    def cell(j: int, text: str) -> str:
        return text.rjust(widths[j]) if j in right else text.ljust(widths[j])

    if markdown:
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(cell(j, c) for j, c in enumerate(cells)) + " |"

        rule = "|" + "|".join(
            ("-" * (widths[j] + 1) + ":") if j in right else ("-" * (widths[j] + 2))
            for j in range(len(header))
        ) + "|"
        return "\n".join([line(header), rule, *(line(r) for r in rows)])
    sep = "  "
    head = sep.join(cell(j, h) for j, h in enumerate(header)).rstrip()
    rule = sep.join("-" * w for w in widths)
    body = [sep.join(cell(j, c) for j, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join([head, rule, *body])


def comparison_table(records: Sequence[RunRecord], *, markdown: bool = False) -> str:
    """One row per run: name, status, rounds, final/best test accuracy, final test loss,
    wall seconds, and where any run recorded them simulated seconds, total bytes and ε.

    Args:
        records: the runs (``load_run``); rows keep this order.
        markdown: a Markdown table instead of aligned plain text.

    Returns:
        The table, without a trailing newline. Missing values show as ``–``.
    """
    rows = [run_row(r) for r in records]
    labels = run_labels(records)
    columns: list[tuple[str, str, Any]] = [
        ("run", "name", None),
        ("status", "status", None),
        ("rounds", "rounds", "d"),
        ("final acc", "final_accuracy", ".4f"),
        ("best acc", "best_accuracy", ".4f"),
        ("test loss", "final_test_loss", ".4f"),
        ("wall s", "wall_seconds", ".1f"),
    ]
    optional = [
        ("sim s", "sim_seconds", ".1f"),
        ("bytes", "total_bytes", "bytes"),
        ("ε", "epsilon", ".3g"),
    ]
    columns += [c for c in optional if any(r[c[1]] is not None for r in rows)]
    cells: list[list[str]] = []
    for label, row in zip(labels, rows, strict=True):
        line = []
        for _, key, spec in columns:
            v = label if key == "name" else row[key]
            if spec is None:
                line.append(str(v))
            elif spec == "bytes":
                line.append("–" if v is None else format_bytes(v))
            else:
                line.append(_fmt(v, spec))
        cells.append(line)
    right = {j for j, c in enumerate(columns) if c[2] is not None}
    return render_table([c[0] for c in columns], cells, markdown=markdown, right=right)


# ---------------------------------------------------------------------------- seeds
def _without(tree: dict[str, Any], dotted: Iterable[str]) -> dict[str, Any]:
    """A deep copy of ``tree`` with the dotted keys removed (absent ones ignored)."""
    out: dict[str, Any] = json.loads(json.dumps(tree, sort_keys=True, default=str))
    for key in dotted:
        *path, leaf = key.split(".")
        node: Any = out
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _mean_std(values: Sequence[float], ddof: int) -> tuple[float, float]:
    x = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    mean = float(x.mean()) if x.size else math.nan
    std = float(x.std(ddof=ddof)) if x.size > ddof else math.nan
    return mean, std


def aggregate_seeds(
    records: Sequence[RunRecord],
    *,
    ignore: Sequence[str] = SEED_INDEPENDENT_KEYS,
    ddof: int = 1,
) -> list[SeedGroup]:
    """Group runs that differ only in their seed and report mean ± std of accuracy.

    Two runs fall in one group when their resolved scenarios are equal after removing
    the dotted keys in ``ignore`` (default: ``seed`` and the ``output`` section, which
    only says where and how the run is written; the run folder itself is not part of
    the scenario). A run with no measured accuracy stays in its group but is left out
    of the statistics.

    Args:
        records: the runs.
        ignore: dotted scenario keys that may differ within a group.
        ddof: delta degrees of freedom of the standard deviation (1: sample standard
            deviation, as usually reported over seeds; 0: population).

    Returns:
        The groups in order of first appearance.

    Raises:
        ValueError: ``ddof`` is negative.
    """
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    groups: dict[str, list[RunRecord]] = {}
    for rec in records:
        key = json.dumps(_without(rec.scenario, ignore), sort_keys=True)
        groups.setdefault(key, []).append(rec)
    out: list[SeedGroup] = []
    name_count: dict[str, int] = {}
    for members in groups.values():
        members = sorted(members, key=lambda r: (_seed(r), str(r.run_dir)))
        finals, bests = [], []
        for r in members:
            f, b = accuracies(r)
            finals.append(math.nan if f is None else f)
            bests.append(math.nan if b is None else b)
        fm, fs = _mean_std(finals, ddof)
        bm, bs = _mean_std(bests, ddof)
        name = members[0].name
        name_count[name] = name_count.get(name, 0) + 1
        out.append(SeedGroup(
            label=name, records=tuple(members), seeds=tuple(_seed(r) for r in members),
            final_accuracies=tuple(finals), final_mean=fm, final_std=fs,
            best_mean=bm, best_std=bs, ddof=ddof,
        ))
    # Same name, different configuration: number them so the table tells them apart.
    seen: dict[str, int] = {}
    for i, g in enumerate(out):
        if name_count[g.label] > 1:
            seen[g.label] = seen.get(g.label, 0) + 1
            out[i] = replace(g, label=f"{g.label} #{seen[g.label]}")
    return out


def _seed(r: RunRecord) -> int:
    s = r.scenario.get("seed")
    return int(s) if isinstance(s, int) and not isinstance(s, bool) else -1


def seed_table(groups: Sequence[SeedGroup], *, markdown: bool = False) -> str:
    """One row per seed group: name, runs, seeds, final and best accuracy as mean ± std."""

    def pm(mean: float, std: float) -> str:
        if not math.isfinite(mean):
            return "–"
        return f"{mean:.4f} ± {std:.4f}" if math.isfinite(std) else f"{mean:.4f}"

    rows = [[g.label, str(len(g.records)), ",".join(str(s) for s in g.seeds),
             pm(g.final_mean, g.final_std), pm(g.best_mean, g.best_std)] for g in groups]
    header = ["scenario", "runs", "seeds", "final acc (mean ± std)", "best acc (mean ± std)"]
    return render_table(header, rows, markdown=markdown, right={1, 3, 4})
