"""DIFF2-GD vs DP-GD at equal ε on a small non-convex task (Murata & Suzuki, ICML 2023).

Usage:
    python scripts/reproduce_diff2.py [--quick] [--seeds 0,1,2] [--rounds 150]
                                      [--out results/diff2_table.md]

Task: sklearn digits (built in; fixed 80/20 split of ``fedflat.data``), an MLP
64-32-10 with tanh (non-convex), P = 10 clients holding the training records (the
estimator only sees their clipped sums, so the split does not change any release).
Both methods run full-batch GD for R rounds with step η, per-record clip C1 = 1 of full
gradients and noise multiplier σ calibrated with ``fedflat.privacy.accounting`` for R
full-batch (q = 1) Gaussian releases at the target ε (δ = 1e-5): DIFF2 spends exactly
the same ledger (one release per round at σ), so ε is equal by construction. DIFF2 uses
a full release every T rounds and clipped differences with C2 in between
(:mod:`fedflat.privacy.diff2`), either with DP-GD's σ on every release ("equal σ") or
with σ1 / σ2 from ``split_sigma`` (equal RDP, hence equal ε).

Direction to expect (the paper's Figs. 1–3: DIFF2-GD reaches a lower train loss /
gradient norm than DP-GD at the same ε, the gap widening as ε shrinks): DIFF2's loss below
DP-GD's at each ε, both above non-private GD.

Budget: default 150 rounds, seeds {0, 1, 2}, ε ∈ {0.5, 1, 2}: 21 runs, ≈ 4 min on a
loaded core (≈ 70 ms a round).
``--quick``: 1 seed, 30 rounds, ε ∈ {1}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedflat.data.datasets import load_dataset  # noqa: E402
from fedflat.privacy.accountant import Accountant  # noqa: E402
from fedflat.privacy.accounting import noise_multiplier  # noqa: E402
from fedflat.privacy.diff2 import Diff2Config, diff2_gd, split_sigma  # noqa: E402
from fedflat.rng import stream  # noqa: E402

DELTA = 1e-5
LR, C1, C2, PERIOD = 0.5, 1.0, 0.1, 10


def problem(seed: int):  # type: ignore[no-untyped-def]
    ds = load_dataset("digits", data_dir=None, seed=0, num_clients=10)
    x, y = ds.x_train.flatten(1).double(), ds.y_train
    xt, yt = ds.x_test.flatten(1).double(), ds.y_test
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    shapes = [(n, p.shape) for n, p in net.named_parameters()]
    gen = stream(seed, "init")
    w0 = torch.cat([(torch.randn(s.numel(), generator=gen, dtype=torch.float64)
                     * (0.5 / s[-1] ** 0.5 if len(s) > 1 else 0.0)) for _, s in shapes])

    def unflat(w: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for n, s in shapes:
            out[n] = w[off:off + s.numel()].view(s)
            off += s.numel()
        return out

    def loss_one(w: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net, unflat(w), (xi[None],))
        return nn.functional.cross_entropy(logits, yi[None])

    onehot = nn.functional.one_hot(y, 10).double()

    def rows(w: torch.Tensor) -> torch.Tensor:
        # Per-record backprop by hand (vmap over 1.4k records is ~30x slower on CPU).
        p = unflat(w)
        h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
        d2 = torch.softmax(h @ p["2.weight"].T + p["2.bias"], dim=1) - onehot
        d1 = (d2 @ p["2.weight"]) * (1 - h * h)
        n = len(y)
        return torch.cat([(d1[:, :, None] * x[:, None, :]).reshape(n, -1), d1,
                          (d2[:, :, None] * h[:, None, :]).reshape(n, -1), d2], dim=1)

    per_record = vmap(grad(loss_one), in_dims=(None, 0, 0))
    # autograd route, for checking the hand-written rows
    rows.check = lambda w: per_record(w, x, y)  # type: ignore[attr-defined]

    def metrics(w: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            train = float(nn.functional.cross_entropy(functional_call(net, unflat(w), (x,)), y))
            acc = float((functional_call(net, unflat(w), (xt,)).argmax(1) == yt).double().mean())
        return train, acc

    return rows, w0, metrics, len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--out", default=str(REPO / "results" / "diff2_table.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    rounds = 30 if args.quick else args.rounds
    eps_grid = [1.0] if args.quick else [0.5, 1.0, 2.0]
    start = time.time()
    rows_md = []

    def run(seed: int, period: int, sigma: float, clip1: float, clip2: float,  # type: ignore[no-untyped-def]
            sigma_diff: float | None = None):
        grads, w0, metrics, n = problem(seed)
        acc = Accountant()
        cfg = Diff2Config(lr=LR, rounds=rounds, period=period, clip_full=clip1,
                          clip_diff=clip2, sigma=sigma, sigma_diff=sigma_diff)
        w = diff2_gd(grads, w0, cfg, stream(seed, "noise"), accountant=acc)
        return (*metrics(w), acc.epsilon(DELTA) if sigma > 0 else float("inf"), n)

    def fmt(vals: list[float]) -> str:
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    base = [run(s, 1, 0.0, 1e9, 1e9) for s in seeds]
    n_records = base[0][3]
    rows_md.append(f"| non-private GD | ∞ | – | {fmt([b[0] for b in base])} | "
                   f"{fmt([b[1] for b in base])} |")
    for eps in eps_grid:
        sigma = noise_multiplier(sampling_rate=1.0, steps=rounds, epsilon=eps, delta=DELTA)
        s1, s2 = split_sigma(sigma, rounds, PERIOD)
        for label, period, sig, sig_d in (
                ("DP-GD", 1, sigma, None),
                (f"DIFF2-GD, equal σ (T={PERIOD}, C2={C2})", PERIOD, sigma, None),
                (f"DIFF2-GD, split σ (T={PERIOD}, C2={C2})", PERIOD, s1, s2)):
            res = [run(s, period, sig, C1, C2, sig_d) for s in seeds]
            spent = max(r[2] for r in res)
            shown = f"{sig:.2f}" if sig_d is None else f"{sig:.2f} / {sig_d:.2f}"
            rows_md.append(f"| {label} | {eps:g} (spent {spent:.3f}) | {shown} | "
                           f"{fmt([r[0] for r in res])} | {fmt([r[1] for r in res])} |")
    took = time.time() - start
    cmd = "python scripts/reproduce_diff2.py" + (" --quick" if args.quick else "")
    text = "\n".join([
        "# DIFF2-GD vs DP-GD at equal ε (digits, MLP 64-32-10 tanh, full batch)",
        "",
        f"Command: `{cmd}`. Seeds {seeds}, R = {rounds} rounds, η = {LR}, C1 = {C1}, "
        f"δ = {DELTA:g}, N = {n_records} training records (10 clients). σ calibrated (RDP) "
        "for R full-batch Gaussian releases (DP-GD); DIFF2 with equal σ records the same "
        "ledger, DIFF2 with split σ spends half of that RDP on its ⌈R/T⌉ full and half on "
        f"its difference releases (`split_sigma`), the same ε. Wall time {took:.0f} s.",
        "",
        "| method | ε | σ (full / difference) | final train loss | test accuracy |",
        "|---|---|---|---|---|",
        *rows_md,
        "",
        "Paper direction (Murata & Suzuki 2023, Figs. 1–3): DIFF2 below DP-GD in train loss "
        "at equal ε, the gap larger at small ε.",
        "",
    ])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
