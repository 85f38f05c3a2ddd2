"""Time one DP-SGD step of fedflat against Opacus 1.6, and DP-SAT against DP-SGD.

Usage:
    python scripts/bench_dp.py [--batch 64] [--steps 5] [--repeats 9]
                               [--models mlp,cnn_gn] [--threads 1]
                               [--grad-sample-mode hooks]

One step = per-example gradients, clipping (C = 1), Gaussian noise (σ = 1), division by
the expected batch size, and an SGD update, on the same model, parameters and batch:

* fedflat: ``dp_sgd(...).grad`` on the flat vector, then ``w -= lr·g``;
* Opacus: ``PrivacyEngine.make_private`` (GradSampleModule + DPOptimizer) with
  ``zero_grad``, forward, backward, ``optimizer.step()``;
* DP-SAT: ``dp_sat(rho=0.03)`` from its second step on (the perturbation is active).

The three run interleaved in blocks of ``steps`` steps, ``repeats`` blocks each; the
figure is the median per-step time over blocks (the minimum is printed too). Before
timing, the script checks that with σ = 0 fedflat's and Opacus' privatised gradients
agree.
Targets (issue 4): fedflat DP-SGD ≤ 1.0× Opacus; DP-SAT ≤ 1.1× DP-SGD.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedflat.client.oracle_base import UpdateContext
from fedflat.models import FlatModel, build_model
from fedflat.privacy.mechanisms import DPOracle, dp_sat, dp_sgd
from fedflat.rng import stream

MODELS: dict[str, tuple[tuple[int, ...], Callable[[], nn.Module]]] = {
    "mlp": (
        (1, 28, 28),
        lambda: build_model("mlp", (1, 28, 28), 10, hidden=(256, 128)),
    ),
    "cnn_gn": (
        (1, 28, 28),
        lambda: build_model("cnn", (1, 28, 28), 10, channels=(16, 32), hidden=(128,),
                            norm="group", groups=4),
    ),
}
CLIP, SIGMA, LR, RHO = 1.0, 1.0, 0.05, 0.03


def opacus_step_fn(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, mode: str
) -> tuple[Callable[[], None], nn.Module, torch.optim.Optimizer]:
    """A closure doing one Opacus DP-SGD step on (x, y)."""
    from opacus import PrivacyEngine

    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, opt, _ = engine.make_private(
            module=module,
            optimizer=torch.optim.SGD(module.parameters(), lr=LR),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=CLIP,
            grad_sample_mode=mode,
        )
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(gsm(x), y).backward()
        opt.step()

    return step, gsm, opt


def fedflat_step_fn(
    oracle: DPOracle,
    model: FlatModel,
    w0: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
) -> Callable[[], None]:
    """A closure doing one fedflat DP step (oracle + SGD update), state carried over."""
    ctx = context(model, w0)
    gen = stream(0, "client", 0, 0)
    holder = {"w": w0.clone(), "state": oracle.init(ctx)}

    def step() -> None:
        w, state = holder["w"], holder["state"]
        _, g, holder["state"], _ = oracle.grad(w, (x, y), state, gen, ctx)
        w.add_(g, alpha=-LR)

    return step


def context(model: FlatModel, w0: torch.Tensor) -> UpdateContext:
    """An update context for a client with many samples (L = the batch size)."""
    return UpdateContext(
        model=model, x_global=w0, round=0, client_id=0, num_samples=10_000
    )


def check_agreement(model: FlatModel, make: Callable[[], nn.Module], w0: torch.Tensor,
                    x: torch.Tensor, y: torch.Tensor, mode: str) -> float:
    """Max relative |fedflat − Opacus| of the σ = 0 privatised gradient."""
    module = make()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(model.unflatten(w0)[name])
    _, gsm, opt = opacus_step_fn(module, x, y, 0.0, mode)
    opt.zero_grad(set_to_none=True)
    nn.CrossEntropyLoss()(gsm(x), y).backward()
    opt.pre_step()  # clip, (no) noise, scale by 1 / expected batch size into p.grad
    ref = torch.cat([p.grad.reshape(-1) for p in gsm.parameters()])
    o = dp_sgd(clip_norm=CLIP, noise_multiplier=0.0, expected_batch_size=len(y))
    ctx = context(model, w0)
    _, g, _, _ = o.grad(w0, (x, y), o.init(ctx), torch.Generator(), ctx)
    return float((g - ref).abs().max() / ref.abs().max())


def bench_model(name: str, args: argparse.Namespace) -> None:
    in_shape, make = MODELS[name]
    model = FlatModel(make())
    w0 = model.init_params(stream(0, "init"))
    gx = stream(0, "data")
    x = torch.randn(args.batch, *in_shape, generator=gx)
    y = torch.randint(0, 10, (args.batch,), generator=gx)
    rel = check_agreement(model, make, w0, x, y, args.grad_sample_mode)

    module = make()
    with torch.no_grad():
        for pname, p in module.named_parameters():
            p.copy_(model.unflatten(w0)[pname])
    kw = {
        "clip_norm": CLIP,
        "noise_multiplier": SIGMA,
        "expected_batch_size": args.batch,
    }
    steps: dict[str, Callable[[], None]] = {
        "opacus": opacus_step_fn(module, x, y, SIGMA, args.grad_sample_mode)[0],
        "dp_sgd": fedflat_step_fn(dp_sgd(**kw), model, w0, x, y),
        "dp_sat": fedflat_step_fn(dp_sat(rho=RHO, **kw), model, w0, x, y),
    }
    for fn in steps.values():  # warm-up (DP-SAT's first step has no perturbation)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for key, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[key].append((time.perf_counter() - t0) / args.steps * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"\n{name}: d = {model.num_params}, batch {args.batch}, "
          f"sigma=0 gradient agreement with Opacus: max rel diff {rel:.1e}")
    for key in steps:
        print(f"  {key:8s} median {med[key]:8.2f} ms/step   min {low[key]:8.2f}")
    r_opacus = med["dp_sgd"] / med["opacus"]
    r_sat = med["dp_sat"] / med["dp_sgd"]
    print(f"  fedflat dp_sgd / opacus = {r_opacus:.2f}x (target <= 1.0)")
    print(f"  dp_sat / dp_sgd         = {r_sat:.2f}x (target <= 1.1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--models", default="mlp,cnn_gn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--grad-sample-mode", default="hooks", choices=["hooks", "functorch"]
    )
    args = ap.parse_args()
    # Opacus' hooks warn on every backward that the inputs need no gradient: harmless.
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in args.models.split(","):
        bench_model(name, args)


if __name__ == "__main__":
    main()
