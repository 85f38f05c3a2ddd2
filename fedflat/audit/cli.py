"""``fedflat audit``: a one-run empirical privacy audit of a scenario's DP mechanism.

fedflat audit scenarios/dp.yaml --canaries 1000
fedflat audit scenarios/dp.yaml --set privacy.sample_level.epsilon=1 --json

Exit code 0 when the claimed ε stands, 1 when the audit refutes it (ε lower bound above the
claimed ε at confidence 1 − α), 2 for bad input. See ``fedflat.audit.scenario_audit``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

from fedflat.audit.scenario_audit import LEVELS, ScenarioAudit, audit_scenario
from fedflat.privacy.audit import FAULTS

Handler = Callable[[argparse.Namespace], int]
EXIT_FLAGGED = 1


def add_audit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``audit`` subcommand; its ``func`` default is ``run_audit``."""
    p = subparsers.add_parser(
        "audit",
        help="one-run empirical privacy audit of the scenario's DP mechanism",
        description=(
            "Runs the scenario's DP mechanism (sample level: its DP oracle on one "
            "client's data; user level: its server steps) with m canaries, each included "
            "with probability 1/2, and prints the empirical ε lower bound of Steinke, "
            "Nasr, Jagielski (2023) next to the ε the accountant claims. Exit code 1 "
            "when the claim is refuted. Audit at a claimed ε near 1: one run certifies "
            "at most ε ≈ 4 with 1000 canaries."
        ),
    )
    p.add_argument("scenario", help="scenario YAML file")
    p.add_argument("--canaries", type=int, default=1000, metavar="M",
                   help="number of canaries m (default 1000)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a scenario key (repeatable)")
    p.add_argument("--level", choices=LEVELS, default=None,
                   help="which guarantee to audit (default: the one the scenario enables)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the bound (default 0.05)")
    p.add_argument("--canary-norm", type=float, default=None, metavar="C",
                   help="norm of a canary gradient/delta (default 10 × the clip norm)")
    p.add_argument("--client", type=int, default=None,
                   help="sample level: client to audit (default the smallest)")
    p.add_argument("--fault", choices=FAULTS, default=None,
                   help="inject an implementation fault (to see the audit catch it)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_audit)
    return p


def register(subparsers: argparse._SubParsersAction, handlers: dict[str, Handler]) -> None:
    """Hook for ``fedflat.cli``: add the subcommand and its handler."""
    add_audit_parser(subparsers)
    handlers["audit"] = run_audit


def _json_ready(d: dict[str, Any]) -> dict[str, Any]:
    # JSON has no infinity: say it in words.
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def format_audit(res: ScenarioAudit) -> str:
    """The human-readable report of one audit (several lines)."""
    level = "sample-level" if res.level == "sample" else "user-level"
    who = f", client {res.client_id} × {res.participations} participations" \
        if res.client_id is not None else ""
    verdict = ("FLAGGED: the claimed ε is refuted" if res.flagged
               else "not flagged: consistent with the claimed ε")
    lines = [
        f"{level} {res.mechanism} audit (q={res.sampling_rate:.4g}, T={res.steps}, "
        f"σ={res.noise_multiplier:.4g}, clip={res.clip_norm:g}{who}"
        + (f", fault={res.fault}" if res.fault else "") + ")",
        f"  empirical ε lower bound {res.epsilon_lower_bound:.3f} "
        f"({100 * (1 - res.alpha):g} % confidence)  vs  claimed ε {res.claimed_epsilon:.3f} "
        f"(δ={res.delta:g}, {res.accountant})",
        f"  {res.correct}/{res.guesses} correct guesses on {res.num_canaries} canaries "
        f"({res.num_included} included, canary norm {res.canary_norm:g}; at most ε "
        f"{res.max_certifiable_epsilon:.2f} certifiable), {res.seconds:.1f} s",
        f"  {verdict}",
    ]
    lines += [f"  note: {n}" for n in res.notes]
    return "\n".join(lines)


def run_audit(args: argparse.Namespace) -> int:
    """Run the audit and print it; 0 = not flagged, 1 = flagged.

    Raises:
        FedflatError: bad input (the CLI prints it and exits with 2).
    """
    res = audit_scenario(args.scenario, list(args.set), canaries=args.canaries,
                         fault=args.fault, level=args.level, alpha=args.alpha,
                         canary_norm=args.canary_norm, client=args.client)
    if args.json:
        print(json.dumps(_json_ready(res.to_dict())))
    else:
        print(format_audit(res))
    return EXIT_FLAGGED if res.flagged else 0
