"""``fedflat privacy``: ε for a noise multiplier, or the noise multiplier for an ε.

fedflat privacy --sampling-rate 0.04 --steps 750 --delta 1e-5 --noise-multiplier 1.84
fedflat privacy --sampling-rate 0.04 --steps 750 --delta 1e-5 --epsilon 3 --accountant pld --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from fedflat.privacy.accounting import (
    ACCOUNTANTS,
    CONVERSIONS,
    calibrate,
    compute_epsilon,
)

Handler = Callable[[argparse.Namespace], int]


def add_privacy_parser(
    subparsers: argparse._SubParsersAction,
) -> argparse.ArgumentParser:
    """Register the ``privacy`` subcommand; its ``func`` default is ``run_privacy``."""
    p = subparsers.add_parser(
        "privacy",
        help="ε for a noise multiplier, or the noise multiplier for a target ε",
        description=(
            "Privacy of T steps of the Poisson-subsampled Gaussian mechanism "
            "(DP-SGD: q = expected batch / n, T = steps; DP-FedAvg: q = expected "
            "clients per round / population, T = rounds)."
        ),
    )
    p.add_argument(
        "--sampling-rate",
        type=float,
        required=True,
        metavar="Q",
        help="Poisson sampling rate q in [0, 1]",
    )
    p.add_argument(
        "--steps",
        type=int,
        required=True,
        metavar="T",
        help="number of steps (or rounds)",
    )
    p.add_argument(
        "--delta", type=float, required=True, metavar="D", help="δ in (0, 1)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--noise-multiplier", type=float, metavar="S", help="σ: print the ε it gives"
    )
    what.add_argument(
        "--epsilon",
        type=float,
        metavar="E",
        help="target ε: print the smallest σ that meets it",
    )
    p.add_argument(
        "--accountant",
        choices=ACCOUNTANTS,
        default="rdp",
        help="rdp (Opacus), prv (Opacus), pld (dp-accounting); default rdp",
    )
    p.add_argument(
        "--conversion",
        choices=CONVERSIONS,
        default="balle",
        help="RDP to (ε, δ) conversion (rdp only); default balle",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="relative tolerance on σ when calibrating; default 1e-3",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="do not read or write the calibration cache file",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_privacy)
    return p


def register(
    subparsers: argparse._SubParsersAction, handlers: dict[str, Handler]
) -> None:
    """Hook for ``fedflat.cli``: add the subcommand and its handler."""
    add_privacy_parser(subparsers)
    handlers["privacy"] = run_privacy


def _json_number(x: float | None) -> float | str | None:
    # JSON has no infinity; say it in words rather than emit a non-standard token.
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def run_privacy(args: argparse.Namespace) -> int:
    """Compute and print; returns the exit code (2 for invalid input)."""
    t0 = time.perf_counter()
    try:
        if args.noise_multiplier is not None:
            res = compute_epsilon(
                [(args.noise_multiplier, args.sampling_rate, args.steps)],
                delta=args.delta,
                accountant=args.accountant,
                conversion=args.conversion,
            )
            sigma, eps, used, note = (
                args.noise_multiplier,
                res.epsilon,
                res.accountant,
                res.note,
            )
            computed = "epsilon"
        else:
            cal = calibrate(
                sampling_rate=args.sampling_rate,
                steps=args.steps,
                epsilon=args.epsilon,
                delta=args.delta,
                accountant=args.accountant,
                conversion=args.conversion,
                rtol=args.rtol,
                use_cache=not args.no_cache,
            )
            sigma, eps, used, note = (
                cal.noise_multiplier,
                cal.epsilon,
                cal.accountant,
                cal.note,
            )
            computed = "noise_multiplier"
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if args.json:
        out: dict[str, Any] = {
            "computed": computed,
            "sampling_rate": args.sampling_rate,
            "steps": args.steps,
            "delta": args.delta,
            "accountant": args.accountant,
            "accountant_used": used,
            "conversion": args.conversion if args.accountant == "rdp" else None,
            "noise_multiplier": sigma,
            "epsilon": _json_number(eps),
            "target_epsilon": args.epsilon,
            "rtol": args.rtol if computed == "noise_multiplier" else None,
            "note": note,
            "seconds": round(seconds, 4),
        }
        print(json.dumps(out))
        return 0
    setting = (
        f"q={args.sampling_rate:g}, T={args.steps}, δ={args.delta:g}, accountant={used}"
        + (f" ({args.conversion} conversion)" if used == "rdp" else "")
    )
    if computed == "epsilon":
        print(f"epsilon = {eps:.6g}  (σ={sigma:g}, {setting})")
    else:
        print(
            f"noise_multiplier = {sigma:.6g}  (ε={eps:.6g} ≤ {args.epsilon:g}, {setting})"
        )
    if note:
        print(f"note: {note}")
    return 0
