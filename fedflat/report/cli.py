"""``fedflat report``: compare run folders in a table and draw their plots.

fedflat report runs/fedavg/20250101-120000 runs/fedsam/20250101-130000
fedflat report runs/fedsam --markdown --out figures/
fedflat report runs/sweeps/quickstart --html report.html   # one self-contained page
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from fedflat.errors import FedflatError

Handler = Callable[[argparse.Namespace], int]


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "report",
        help="compare runs: table of accuracy, time, bytes, ε; PNG plots",
        description=(
            "Print one table row per run and write PNG plots of all runs overlaid. A "
            "folder that is not itself a run but holds run folders (runs/<name>/) stands "
            "for all of them. Runs that differ only in their seed are also summarised as "
            "mean ± std."
        ),
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the plots (default: <first run's parent>/report)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--html", default=None, metavar="FILE",
                   help="write one self-contained HTML page (tables, embedded plots, per-client "
                   "fairness, privacy ledger, resolved scenarios) instead of a plots folder; "
                   "RUN_DIR may also be a sweep folder")
    return p


def run_report(args: argparse.Namespace) -> int:
    """Print the tables, write the plots, say where; returns 0.

    Raises:
        FedflatError: a folder is not a run (the message names the missing file).
    """
    # Imported here so that ``fedflat --help`` does not pay for matplotlib.
    from fedflat.report.html import collect, write_html
    from fedflat.report.plots import draw_plots
    from fedflat.report.tables import (
        aggregate_seeds,
        comparison_table,
        seed_table,
    )

    records, _ = collect(args.run_dirs)
    dirs = [r.run_dir for r in records]
    for r in records:
        if r.torn_line is not None:
            print(f"warning: {r.run_dir / 'metrics.jsonl'}:{r.torn_line}: torn last line (a run "
                  "killed mid-write, or still writing); ignored", file=sys.stderr)
    print(comparison_table(records, markdown=args.markdown))
    groups = aggregate_seeds(records)
    if any(len(g.records) > 1 for g in groups):
        print()
        print(seed_table(groups, markdown=args.markdown))
    if args.html is not None:
        page = write_html(args.run_dirs, args.html)
        print(f"\nHTML report written to {page}")
        return 0
    out = Path(args.out) if args.out is not None else dirs[0].parent / "report"
    if out.exists() and not out.is_dir():
        raise FedflatError(f"--out {out} exists and is not a folder")
    written = draw_plots(records, out)
    print()
    if written:
        print(f"{len(written)} plots written to {out}/: " + ", ".join(p.name for p in written))
    else:
        print("no plots written: the runs have no per-round metrics yet")
    return 0


def register(subparsers: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """Hook for ``fedflat.cli``: add the ``report`` subcommand and its handler."""
    add_report_parser(subparsers)
    handlers["report"] = run_report
