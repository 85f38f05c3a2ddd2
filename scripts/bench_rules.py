"""Time every aggregation rule on an [n, d] float32 update matrix.

Usage:
    python scripts/bench_rules.py                       # n=100, d=10^6, 1 thread
    python scripts/bench_rules.py --threads 2 --repeats 5
    python scripts/bench_rules.py --only caf,smea,mda   # rows whose label contains one

Prints seconds per call (median and min of the repeats) for each rule, unweighted,
and for the rules whose weighted path differs (median, trimmed mean) also weighted,
then the pre-aggregators in front of the median. Target on a CPU core: < 1 s per call
for the non-combinatorial rules. The combinatorial ones (mda, smea) are timed at n =
100 with the largest f their subset limit allows (mda: C(100, 2) = 4950 <= 100 000;
smea: C(100, 1) 99^3 = 9.7e7 <= 1.6e8), and at n = 25 next to the limit (mda f = 5,
C(25, 5) = 53 130; smea f = 4, C(25, 4) 21^3 = 1.2e8), both with d = 10^6.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from fedflat.rng import stream
from fedflat.server.rules import apply_rule


def _cases(f: int) -> list[tuple[str, str, dict[str, Any], bool]]:
    """(label, rule, params, weighted) rows of the table at the benchmark's n."""
    fb = {"num_byzantine": f}
    return [
        ("mean", "mean", {}, False),
        ("mean (weighted)", "mean", {}, True),
        ("median", "median", {}, False),
        ("median (weighted)", "median", {}, True),
        ("trimmed_mean b=0.1", "trimmed_mean", {"trim_ratio": 0.1}, False),
        ("trimmed_mean b=0.1 (weighted)", "trimmed_mean", {"trim_ratio": 0.1}, True),
        (f"krum f={f}", "krum", {"num_byzantine": f}, False),
        (f"multi_krum f={f}", "multi_krum", {"num_byzantine": f}, False),
        (f"bulyan f={f}", "bulyan", {"num_byzantine": f}, False),
        ("geometric_median (4 it)", "geometric_median", {"tol": 0.0, "max_iters": 4}, True),
        (
            "centered_clipping (L=3)",
            "centered_clipping",
            {"tau": 10.0, "iters": 3},
            False,
        ),
        (f"meamed f={f}", "meamed", fb, False),
        (f"monna f={f}", "monna", fb, False),
        (f"caf f={f}", "caf", fb, False),
        ("mda f=2 (subset limit at n=100)", "mda", {"num_byzantine": 2}, False),
        ("smea f=1 (subset limit at n=100)", "smea", {"num_byzantine": 1}, False),
        ("bucketing s=2 + median", "median", {"bucket_size": 2}, False),
        ("bucketing s=2 + mean", "mean", {"bucket_size": 2}, False),
        (f"nnm f={f} + median", "median", {"pre": ["nnm"], **fb}, False),
        (f"arc f={f} + median", "median", {"pre": ["arc"], **fb}, False),
        ("clip + median", "median", {"pre": ["clip"], "clip_norm": 1.0}, False),
        (f"nnm f={f} + krum", "krum", {"pre": ["nnm"], **fb}, False),
    ]


# Combinatorial rules at their documented subset limits (rows of n = 25 inputs).
LIMIT_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("mda n=25 f=5 (C = 53 130 <= 100 000)", "mda", {"num_byzantine": 5}),
    ("smea n=25 f=4 (C 21^3 = 1.2e8 <= 1.6e8)", "smea", {"num_byzantine": 4}),
]


def _time(label: str, x: torch.Tensor, w: torch.Tensor | None, rule: str,
          params: dict[str, Any], repeats: int) -> None:
    times = []
    for i in range(repeats + 1):
        g = stream(0, "server", i)
        t0 = time.perf_counter()
        agg, _, _ = apply_rule(x, w, rule=rule, params=params, state={}, gen=g)
        elapsed = time.perf_counter() - t0
        if i > 0:  # the first call warms up allocators and kernels
            times.append(elapsed)
        if not bool(torch.isfinite(agg).all()):
            raise RuntimeError(f"{label}: non-finite aggregate")
    print(f"{label:40s} {statistics.median(times):9.3f} {min(times):7.3f}", flush=True)


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="number of updates (rows)")
    ap.add_argument("--d", type=int, default=1_000_000, help="parameters per update")
    ap.add_argument(
        "--f", type=int, default=None, help="num_byzantine (default min(10, (n-3)//4))"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per rule")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--only", default="", help="comma-separated label substrings")
    args = ap.parse_args()
    only = [t for t in args.only.split(",") if t]

    def wanted(label: str) -> bool:
        return not only or any(t in label for t in only)

    torch.set_num_threads(args.threads)
    f = min(10, (args.n - 3) // 4) if args.f is None else args.f

    gen = stream(0, "eval", 0)
    x = torch.randn(args.n, args.d, generator=gen, dtype=torch.float32)
    weights = torch.randint(10, 500, (args.n,), generator=gen).to(torch.float64)
    print(
        f"n={args.n} d={args.d} float32, threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}, median of {args.repeats} calls (1 warm-up)"
    )
    print(
        f"load average before: {os.getloadavg()[0]:.2f} (other processes skew timings)"
    )
    print(f"{'rule':40s} {'median s':>9s} {'min s':>7s}")
    for label, rule, params, weighted in _cases(f):
        if wanted(label):
            _time(label, x, weights if weighted else None, rule, params, args.repeats)
    for label, rule, params in LIMIT_CASES:
        if wanted(label):
            _time(label, x[:25], None, rule, params, args.repeats)


if __name__ == "__main__":
    main()
