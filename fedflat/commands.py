"""The core commands — run, validate, resume — and how a command is dispatched.

Their own module so that code below the command line (the sweep's in-process launcher) can
run ``fedflat run`` / ``resume`` without importing ``fedflat.cli``, which registers the
sweep's own subcommand. Input errors print one line naming the file, the key and the line,
and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedflat.errors import FedflatError

Handler = Callable[[argparse.Namespace], int]


def _cmd_run(args: argparse.Namespace) -> int:
    from fedflat.runtime.run import run

    res = run(args.scenario, overrides=args.set, out=args.out)
    _print_result(res)
    return _exit_code(res)


def _cmd_resume(args: argparse.Namespace) -> int:
    from fedflat.runtime.run import resume

    res = resume(args.run_dir)
    _print_result(res)
    return _exit_code(res)


def _exit_code(res) -> int:  # type: ignore[no-untyped-def]
    """0, or EXIT_DIVERGED (3) for a run whose loss exploded."""
    from fedflat.runtime.driver import EXIT_DIVERGED

    return EXIT_DIVERGED if res.summary.get("status") == "diverged" else 0


def _print_result(res) -> None:  # type: ignore[no-untyped-def]
    s = res.summary
    acc = s.get("final_test_accuracy")
    acc_txt = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
    print(f"run {s.get('status')}: {s.get('rounds_completed')}/{s.get('rounds_planned')} rounds, "
          f"test accuracy {acc_txt}, {s.get('wall_seconds', 0):.1f} s -> {res.run_dir}")


def _cmd_validate(args: argparse.Namespace) -> int:
    from fedflat.scenario.loader import load_scenario

    loaded = load_scenario(args.scenario, args.set)
    from fedflat.runtime.preflight import preflight

    fed = None
    if args.data:
        from fedflat.runtime.driver import load_data

        fed = load_data(loaded)
        print(f"data: {fed.dataset.name}, {fed.num_clients} clients, "
              f"{int(fed.client_sizes().sum())} training samples")
    checked = preflight(loaded, fed)  # what run checks before it creates the run folder
    for note in checked.notes:
        print(f"privacy: {note}")
    print(f"{args.scenario}: ok ({loaded.scenario.name})")
    return 0


def add_core_commands(sub: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """Add ``run``, ``validate`` and ``resume`` and their handlers."""
    p = sub.add_parser("run", help="run a scenario")
    p.add_argument("scenario")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default runs/<name>/<timestamp>)")
    handlers["run"] = _cmd_run

    p = sub.add_parser("validate", help="check a scenario without running it")
    p.add_argument("scenario")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--data", action="store_true", help="also load the data and partition it")
    handlers["validate"] = _cmd_validate

    p = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    p.add_argument("run_dir")
    handlers["resume"] = _cmd_resume


def new_parser(
    description: str,
) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="fedflat", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}
    add_core_commands(sub, handlers)
    return parser, sub, handlers


def dispatch(parser: argparse.ArgumentParser, handlers: dict[str, Handler],
             argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its handler: input errors are one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except FedflatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last completed round is checkpointed; continue with "
              "'fedflat resume RUN_DIR'", file=sys.stderr)
        return 130


def run_core(argv: Sequence[str]) -> int:
    """``fedflat run|validate|resume ...`` as the command line runs it (exit code)."""
    parser, _, handlers = new_parser("fedflat core commands")
    return dispatch(parser, handlers, argv)
