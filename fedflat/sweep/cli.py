"""``fedflat sweep``: run a scenario over a grid of key values and seeds, then tabulate.

fedflat sweep scenarios/quickstart.yaml --grid client.lr=0.01,0.1 --seeds 3 --jobs 2
fedflat sweep my_sweep.yaml            # a sweep file (see fedflat.sweep.spec)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from fedflat.errors import FedflatError

Handler = Callable[[argparse.Namespace], int]


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to ``subparsers``."""
    p = subparsers.add_parser(
        "sweep", help="run a grid of scenarios x seeds (resumable) and tabulate them",
        description=(
            "Run SCENARIO once per grid point and seed, JOBS at a time, one run folder each "
            "under the sweep folder; then write results.md/.csv/.json (mean ± std and 95 %% "
            "Student-t CI across seeds) and plots/. The same command again skips finished "
            "runs and resumes interrupted ones from their checkpoints. SCENARIO may be a sweep "
            "file (YAML with scenario, grid, zip, seeds, ...); flags given here override it."),
    )
    p.add_argument("scenario", help="a scenario YAML, or a sweep file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY.PATH=V1,V2,...",
                   help="a grid axis (repeatable); values are parsed as YAML")
    p.add_argument("--zip", action="append", default=[], metavar="KEY1,KEY2",
                   help="grid keys that vary together instead of crossing (repeatable)")
    p.add_argument("--seeds", default=None, metavar="K|S1,S2",
                   help="K seeds 0..K-1, or a list (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="runs at a time (default 1)")
    p.add_argument("--ray", action="store_true",
                   help="start the runs as Ray tasks (a local Ray, or the cluster of the "
                   "scenario's runtime.address; the sweep folder must be visible to every node)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of every run (repeatable)")
    p.add_argument("--out", default=None,
                   help="sweep folder (default <output.dir>/sweeps/<scenario name>)")
    p.add_argument("--target", type=float, default=None,
                   help="test accuracy for the 'rounds to target' column")
    p.add_argument("--no-plots", action="store_true", help="skip the sweep's plots")
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    """Validate, run, tabulate; 0 if every run finished, 1 if some failed."""
    from fedflat.scenario.loader import read_yaml
    from fedflat.sweep.plots import draw_sweep_plots
    from fedflat.sweep.results import write_tables
    from fedflat.sweep.runner import FINAL, default_sweep_dir, run_sweep
    from fedflat.sweep.spec import (
        SweepSpec,
        is_sweep_file,
        load_sweep_file,
        parse_grid_args,
        parse_seeds,
    )

    if is_sweep_file(args.scenario):
        spec = load_sweep_file(args.scenario)
    else:
        read_yaml(args.scenario)  # a missing or malformed scenario: one located line
        spec = SweepSpec(scenario=args.scenario)
    spec.sets += args.set
    spec.grid.update(parse_grid_args(args.grid))
    spec.zip += [[k.strip() for k in z.split(",") if k.strip()] for z in args.zip]
    if args.seeds is not None:
        spec.seeds = parse_seeds(args.seeds)
    if args.jobs is not None:
        if args.jobs < 1:
            raise FedflatError(f"--jobs must be >= 1, got {args.jobs}")
        spec.jobs = args.jobs
    if args.ray:
        spec.ray = True
    if args.target is not None:
        spec.target = args.target
    if args.out is not None:
        spec.out = args.out
    folder = Path(spec.out) if spec.out is not None else default_sweep_dir(spec)
    runs = run_sweep(spec, folder)
    paths = write_tables(folder, spec.target)
    print()
    print(paths["md"].read_text().rstrip())
    if not args.no_plots:
        plots = draw_sweep_plots(folder)
        if plots:
            print(f"\n{len(plots)} plots in {folder / 'plots'}/")
    print(f"tables: {paths['md']}, {paths['csv'].name}, {paths['json'].name}")
    diverged = [r for r in runs if r.status == "diverged"]
    if diverged:
        print(f"{len(diverged)} runs diverged (not counted in the table): "
              + ", ".join(r.name for r in diverged))
    bad = [r for r in runs if r.status not in FINAL]
    if bad:
        print(f"{len(bad)} runs did not finish ({', '.join(sorted({r.status for r in bad}))}); "
              "the same command resumes them")
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """Hook for ``fedflat.cli``: add the ``sweep`` subcommand and its handler."""
    add_sweep_parser(subparsers)
    handlers["sweep"] = run_sweep_command
