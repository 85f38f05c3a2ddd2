"""Time one local step (oracle + SGD update) of each gradient oracle relative to SGD.

Usage:
    python scripts/bench_oracles.py [--batch 64] [--steps 10] [--repeats 5]
                                    [--min-block-s 0.3]
                                    [--models cnn,cnn_gn,mlp] [--threads 1]
                                    [--device cpu]

For each model the oracles run interleaved, ``repeats`` times ``steps`` steps each, on
the same batch; the per-step time of an oracle is its fastest block (robust to other
processes on a shared machine), reported in ms and as a ratio to SGD. Targets (issue 3):
SAM ≤ 2.1× SGD, FedLESAM ≤ 1.15×, GAM ≈ its pass count (4).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from fedflat.client.oracle_base import Oracle, UpdateContext, plain
from fedflat.client.oracles import asam, fedsmoo, fisher_sam, gam, lesam, sam, sam_on
from fedflat.models import FlatModel, build_model
from fedflat.rng import stream

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "cnn": lambda: build_model("cnn", (1, 28, 28), 62),
    "cnn_gn": lambda: build_model("cnn", (1, 28, 28), 62, norm="group"),
    "mlp": lambda: build_model("mlp", (1, 28, 28), 62, hidden=(200, 200)),
}


def oracles(has_norm: bool) -> dict[str, Oracle]:
    out = {
        "sgd": plain(),
        "sam": sam(rho=0.05),
        "asam": asam(rho=0.5, eta=0.01),
        "fisher_sam": fisher_sam(rho=0.1, eta_f=1.0),
        "fedsmoo": fedsmoo(rho=0.1),
        "gam": gam(grad_rho=0.03, grad_norm_rho=0.2, beta0=0.1, beta1=0.1, gamma=0.05),
        "lesam": lesam(rho=0.5),
    }
    if has_norm:
        out["sam_on"] = sam_on(rho=1.0)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    model = FlatModel(MODELS[name](), device=device)
    model.module.train()
    w0 = model.init_params(stream(0, "init"))
    gen = stream(0, "data")
    x = torch.randn(args.batch, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 62, (args.batch,), generator=gen).to(device)
    u = (0.01 * torch.randn(w0.numel(), generator=gen)).to(device)
    ctx = UpdateContext(
        model=model,
        x_global=w0,
        round=1,
        client_id=0,
        num_samples=args.batch,
        broadcast={"prev_global_update": u},
    )
    has_norm = any(s.module_type is torch.nn.GroupNorm for s in model.segments)
    table = oracles(has_norm)
    best = dict.fromkeys(table, float("inf"))
    grad_gen = stream(0, "client")

    def block(oracle: Oracle, steps: int) -> float:
        state = oracle.init(ctx)
        w = w0.clone()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            _, g, state, _ = oracle.grad(w, (x, y), state, grad_gen, ctx)
            w = w - 0.01 * g
        sync(device)
        return (time.perf_counter() - t0) / steps

    # Warm-up, then size the blocks so that an SGD block lasts >= min_block_s (short
    # blocks of a small model are at the mercy of other processes' time slices).
    for oracle in table.values():
        block(oracle, 2)
    sgd_s = block(table["sgd"], args.steps)
    steps = max(args.steps, math.ceil(args.min_block_s / sgd_s))
    for _ in range(args.repeats):
        for oname, oracle in table.items():
            best[oname] = min(best[oname], block(oracle, steps))
    base = best["sgd"]
    print(
        f"\n{name}: d={model.num_params}, batch={args.batch}, "
        f"steps/block={steps}, device={device}"
    )
    print(f"{'oracle':<11}{'passes':>7}{'ms/step':>10}{'x SGD':>8}")
    for oname, oracle in table.items():
        ms, ratio = 1e3 * best[oname], best[oname] / base
        print(f"{oname:<11}{oracle.passes:>7}{ms:>10.2f}{ratio:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-block-s", dest="min_block_s", type=float, default=0.3)
    p.add_argument("--models", default="cnn,cnn_gn,mlp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench_model(name.strip(), args)


if __name__ == "__main__":
    main()
