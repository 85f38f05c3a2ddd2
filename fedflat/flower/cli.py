"""``fedflat flower simulate | app``: the Flower subcommands of the fedflat CLI."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from fedflat.errors import FedflatError

Handler = Callable[[argparse.Namespace], int]


def _require_flwr() -> None:
    """Turn a missing optional dependency into a one-line error (exit code 2)."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("tomli_w") is None:
        raise FedflatError("Flower is not installed: pip install -e '.[flower]' "
                           "(flwr[simulation]==1.42.0)")


def _cmd_simulate(args: argparse.Namespace) -> int:
    _require_flwr()
    from fedflat.flower.simulate import simulate

    res = simulate(args.scenario, overrides=args.set, out=args.out,
                   cpus_per_client=args.cpus_per_client, total_cpus=args.total_cpus,
                   verbose=args.verbose, secagg=args.secagg)
    s = res.summary
    acc = s.get("final_test_accuracy")
    acc_txt = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
    print(f"flower simulation {s.get('status')}: {s.get('rounds_completed')}/"
          f"{s.get('rounds_planned')} rounds, test accuracy {acc_txt}, "
          f"{s.get('wall_seconds', 0):.1f} s -> {res.run_dir}")
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    _require_flwr()
    from fedflat.flower.app import write_app

    path = write_app(args.scenario, args.dir, overrides=args.set, force=args.force,
                     out_dir=args.out_dir or "", reply_timeout_s=args.reply_timeout,
                     node_timeout_s=args.node_timeout, on_failure=args.on_failure)
    print(f"Flower app written to {path}; launch it with 'flwr run {path} <superlink>' "
          f"(see {path / 'README.md'})")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    return int(args.flower_handler(args))


def register(subparsers: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """Add ``flower simulate`` and ``flower app`` to the fedflat CLI."""
    p = subparsers.add_parser("flower", help="run a scenario through Flower (simulation or a "
                              "deployable app)")
    sub = p.add_subparsers(dest="flower_command", required=True)

    s = sub.add_parser("simulate", help="run a scenario in Flower's simulation engine (one "
                       "virtual SuperNode per client)")
    s.add_argument("scenario")
    s.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key (repeatable)")
    s.add_argument("--out", default=None, help="run folder (default runs/<name>/<timestamp>)")
    s.add_argument("--cpus-per-client", type=float, default=None,
                   help="CPUs per virtual client (default runtime.num_cpus)")
    s.add_argument("--total-cpus", type=int, default=None,
                   help="CPUs Flower's Ray may use (default runtime.num_actors x cpus per client)")
    s.add_argument("--verbose", action="store_true", help="Flower's debug logs")
    s.add_argument("--secagg", action="store_true", help="every round through Flower's SecAgg+ "
                   "(as flower.secagg: true; only rule 'mean', see fedflat.flower.secagg)")
    s.set_defaults(flower_handler=_cmd_simulate)

    a = sub.add_parser("app", help="write a Flower app folder for 'flwr run' on a deployed "
                       "federation")
    a.add_argument("scenario")
    a.add_argument("dir", help="app folder (a letter, then letters, digits, hyphens)")
    a.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key (repeatable)")
    a.add_argument("--out-dir", default="", help="run folder on the SuperLink machine "
                   "(default <output.dir>/<name>/<stamp>)")
    a.add_argument("--reply-timeout", type=float, default=0.0,
                   help="seconds a round waits for replies (0 = forever)")
    a.add_argument("--node-timeout", type=float, default=300.0,
                   help="seconds to wait until every client has a SuperNode")
    a.add_argument("--on-failure", choices=["abort", "drop"], default="abort",
                   help="a failed reply fails the run (abort) or is left out of the round (drop)")
    a.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    a.set_defaults(flower_handler=_cmd_app)

    handlers["flower"] = _dispatch
