"""The ``fedflat`` command line: run | validate | resume | privacy | ...

Input errors print one line naming the file, the key and the line, and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from fedflat.commands import Handler, dispatch, new_parser


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser, sub, handlers = new_parser(__doc__.splitlines()[0])
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
    return dispatch(parser, handlers, argv)


if __name__ == "__main__":
    sys.exit(main())
