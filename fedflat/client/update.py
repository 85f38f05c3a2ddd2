"""One client update: local steps from the global model, returning a delta.

The local rule is the local chain (``fedflat.client.local_chain``: oracle -> corrections ->
gradient clip) followed by the base optimizer. The loop below never changes when an oracle
(SAM, DP), a correction (FedProx, SCAFFOLD) or another step is added.
Everything random comes from the generator of (seed, "client", round, client_id).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedflat.client.local_chain import (
    LOSS,
    ORACLE,
    LocalChain,
    LocalStep,
    StepEnd,
    StepInput,
    chain,
    clip_grad,
    oracle_step,
)
from fedflat.client.optim import LocalOptimizer
from fedflat.client.oracle_base import Oracle, UpdateContext
from fedflat.client.zeroth_order import ZOState


@dataclass(frozen=True)
class LocalSchedule:
    """How many local steps and which batches.

    Attributes:
        batch_size: mini-batch size b.
        epochs: local epochs E (a fresh permutation per epoch, last batch may be smaller).
        steps: local steps K instead of epochs (batches cycle through permutations).
        batching: "shuffle" (the above) or "poisson" (each example joins each step's batch
            independently with probability batch_size / n; batches vary in size, may be empty,
            and are never resampled — what DP-SGD's accounting assumes).
    """

    batch_size: int
    epochs: int | None = 1
    steps: int | None = None
    batching: str = "shuffle"
    sampling_rate: float | None = None  # poisson: fixed q instead of batch_size / n

    def rate(self, n: int) -> float:
        """Poisson sampling rate q of a client with n examples."""
        if self.sampling_rate is not None:
            return self.sampling_rate
        return min(1.0, self.batch_size / n)

    def num_steps(self, n: int) -> int:
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None  # noqa: S101 - guaranteed by the scenario schema
        per_epoch = math.ceil(n / self.batch_size) if self.batching == "shuffle" else max(
            1, round(1.0 / self.rate(n)))
        return self.epochs * per_epoch


@dataclass(frozen=True)
class LocalRule:
    """The local rule of a client update: its chain's pieces, the base optimizer, the schedule.

    Attributes:
        oracle: the gradient oracle (the chain's first step, named ``"oracle"``).
        corrections: the drift corrections, in the order they adjust the gradient.
        optimizer: the base optimizer that moves the parameters by the chain's output.
        schedule: local steps and batches.
        grad_clip: optional global-norm clip of the corrected gradient (FL-Simulator's
            ``clip_grad_norm_``), the chain's last step; None for none.
    """

    oracle: Oracle
    corrections: Sequence[LocalStep]
    optimizer: LocalOptimizer
    schedule: LocalSchedule
    grad_clip: float | None = None

    @property
    def chain(self) -> LocalChain:
        """oracle -> corrections -> clip, in the order the maths needs."""
        clip = () if self.grad_clip is None else (clip_grad(self.grad_clip),)
        return chain(oracle_step(self.oracle), *self.corrections, *clip)


@dataclass
class ClientResult:
    """What one client update returns (the delta travels flat)."""

    client_id: int
    delta: Tensor
    num_samples: int
    train_loss: float
    steps: int
    client_state: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # The model's BatchNorm running statistics after the update (``model.bn_aggregation:
    # average``), averaged by the server like the parameters; empty otherwise.
    buffers: Tensor = field(default_factory=lambda: torch.zeros(0))
    # Zeroth-order clients: the (seeds, scalars) message the server can replay the update
    # from (``fedflat.client.zeroth_order``); empty otherwise.
    message: dict[str, Tensor] = field(default_factory=dict)


def batch_indices(
    n: int, schedule: LocalSchedule, gen: torch.Generator, max_steps: int | None = None
) -> Iterator[Tensor]:
    """Yield the index tensors of the local mini-batches of one client update."""
    total = schedule.num_steps(n)
    if max_steps is not None:
        total = min(total, max_steps)
    # Drawn on the generator's device (CUDA refuses a CUDA generator for a CPU draw); the
    # indices then live where the worker's data lives.
    dev = gen.device
    if schedule.batching == "poisson":
        q = schedule.rate(n)
        for _ in range(total):
            yield torch.nonzero(torch.rand(n, generator=gen, device=dev) < q).squeeze(1)
        return
    b = schedule.batch_size
    done = 0
    while done < total:
        perm = torch.randperm(n, generator=gen, device=dev)
        for i in range(0, n, b):
            yield perm[i : i + b]
            done += 1
            if done == total:
                return


def client_update(
    rule: LocalRule,
    ctx: UpdateContext,
    x: Tensor,
    y: Tensor,
    lr: float,
    gen: torch.Generator,
    max_steps: int | None = None,
) -> ClientResult:
    """Run the local rule on one client's data (x, y) starting from ``ctx.x_global``.

    Args:
        rule: the composed local rule.
        ctx: the update context (model, global params, round, client id, broadcast, state).
        x, y: this client's training examples.
        lr: the local learning rate of this round.
        gen: the client's generator for this round.
        max_steps: cap on local steps (partial work of a straggler), None for no cap.
    """
    local, opt = rule.chain, rule.optimizer
    w = ctx.x_global.clone()
    states = local.init(ctx)
    opt_state = opt.init(w)
    loss_sum, steps, counted = 0.0, 0, 0
    metrics: dict[str, float] = {}
    for idx in batch_indices(len(y), rule.schedule, gen, max_steps):
        g, states, m = local.update(states, StepInput(w, (x[idx], y[idx]), gen, ctx))
        w, opt_state = opt.step(w, g, opt_state, lr)
        steps += 1
        loss = m.pop(LOSS)
        if len(idx):
            loss_sum += float(loss)
            counted += 1
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    state, extras = local.finish(states, StepEnd(w, steps, lr, ctx))
    metrics = {k: v / max(steps, 1) for k, v in metrics.items()}
    message: dict[str, Tensor] = {}
    ostate = states[ORACLE]
    if isinstance(ostate, ZOState):  # a total per update, not a per-step mean
        message = ostate.message()
        metrics["zo_queries"] = float(ostate.queries)
    return ClientResult(
        client_id=ctx.client_id,
        delta=w - ctx.x_global,
        num_samples=len(y),
        train_loss=loss_sum / counted if counted else float("nan"),
        steps=steps,
        client_state=state,
        extras=extras,
        metrics=metrics,
        message=message,
    )
