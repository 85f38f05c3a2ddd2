"""The ``fedflat`` command line: run | validate | resume | privacy | ...

Input errors print one line naming the file, the key and the line, and exit with code 2.
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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="fedflat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}

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

    for register in _extensions():
        register(sub, handlers)
    return parser, handlers


def _extensions() -> list[Callable[[argparse._SubParsersAction, dict[str, Handler]], None]]:
    """Subcommands contributed by other modules (privacy, audit, report, flower)."""
    regs = []
    try:
        from fedflat.privacy.cli import register as privacy_register

        regs.append(privacy_register)
    except ImportError:
        pass
    from fedflat.audit.cli import register as audit_register
    from fedflat.report.cli import register as report_register
    from fedflat.sweep.cli import register as sweep_register

    regs.extend([audit_register, report_register, sweep_register])
    try:  # needs the optional flwr package: pip install -e '.[flower]'
        from fedflat.flower.cli import register as flower_register

        regs.append(flower_register)
    except ImportError:
        pass
    return regs


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
