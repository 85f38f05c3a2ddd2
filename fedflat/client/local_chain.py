"""The local chain: what turns the parameters and a mini-batch into the base optimizer's input.

Every piece of the local rule has one shape, optax's ``GradientTransformation`` made for one
local step of a client: a name and three pure functions ::

    init(ctx) -> state                           # at the start of one client update
    update(g, state, at) -> (g, state, metrics)  # at every local step
    finish(state, end) -> (client_state, extras) # once, after the last local step

``g`` is the gradient so far (None for the first step); ``at`` is what a step may read at this
local step (``StepInput``: the parameters, the batch, the client's generator, the update
context); ``finish`` returns the client's new persistent state entries and the vectors it
uplinks next to the delta (SCAFFOLD's Δc_i, ...). ``chain`` runs the steps in the order the
maths needs ::

    chain(oracle_step(oracle), *corrections, clip_grad(C))

the oracle first (it evaluates the model and reports the mini-batch loss as the metric
``"loss"``), then the drift corrections (``fedflat.client.local_corrections``), then the
global-norm clip. The base optimizer (``fedflat.client.optim``) then moves the parameters by
the chain's output, as ``optax.apply_updates`` does after a chain; it stays apart so that the
parameters are updated in place in exactly ``torch.optim``'s operation order. What the client
sends then passes through the uplink chain (``fedflat.client.uplink``: clip → noise → codec).

The steps' states are held keyed by step name, never by position, so a step can be inserted
without shifting the others' states; the persistent state a step returns from ``finish`` is
under keys the step owns (``scaffold_ci``, ``feddyn_grad``, ...), merged in chain order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fedflat.client.oracle_base import Batch, Oracle, UpdateContext

State = dict[str, Tensor]
# A step's metrics: floats, except the oracle's "loss", the 0-d batch-loss tensor (read only
# for a non-empty batch).
StepMetrics = dict[str, Any]

ORACLE = "oracle"  # the oracle step's name
LOSS = "loss"  # the oracle step's metric: mean mini-batch loss at w (NaN for an empty batch)


class StepInput(NamedTuple):
    """What a step may read at one local step (``w`` must not be mutated)."""

    w: Tensor
    batch: Batch
    gen: torch.Generator
    ctx: UpdateContext


class StepEnd(NamedTuple):
    """What ``finish`` may read: the final parameters ``y``, the local steps taken, the
    learning rate used and the update context."""

    y: Tensor
    steps: int
    lr: float
    ctx: UpdateContext


def no_finish(state: Any, end: StepEnd) -> tuple[State, State]:
    """The ``finish`` of a step that keeps no persistent state and uplinks nothing."""
    return {}, {}


class LocalStep(NamedTuple):
    """One step of the local chain (see the module docstring for the shape).

    Attributes:
        name: unique within a chain; keys the step's state.
        init: ``init(ctx) -> state``.
        update: ``update(g [d] or None, state, at) -> (g [d], state, metrics)``; pure.
        finish: ``finish(state, end) -> (client state entries, uplink extras)``.
        passes: forward+backward passes per local step (the oracle's; 0 otherwise), for
            cost reports.
    """

    name: str
    init: Callable[[UpdateContext], Any]
    update: Callable[[Tensor | None, Any, StepInput], tuple[Tensor, Any, StepMetrics]]
    finish: Callable[[Any, StepEnd], tuple[State, State]] = no_finish
    passes: int = 0


def oracle_step(oracle: Oracle, *, name: str = ORACLE) -> LocalStep:
    """The gradient oracle as the chain's first step: it ignores the incoming ``g`` and
    returns the oracle's gradient at ``at.w``, its metrics and its loss (``"loss"``)."""

    def update(g: Tensor | None, state: Any, at: StepInput) -> tuple[Tensor, Any, StepMetrics]:
        loss, grad, state, m = oracle.grad(at.w, at.batch, state, at.gen, at.ctx)
        return grad, state, {LOSS: loss, **m}

    finish = oracle.finish if oracle.finish is not None else no_finish
    return LocalStep(name, init=oracle.init, update=update, finish=finish,
                     passes=oracle.passes)


def clip_grad(max_norm: float, *, name: str = "grad_clip") -> LocalStep:
    """Global-norm clip of the gradient, ``g · C / max(‖g‖, C)`` (FL-Simulator's
    ``clip_grad_norm_``); a zero gradient stays zero.

    Raises:
        ValueError: ``max_norm`` is not > 0.
    """
    if not max_norm > 0:
        raise ValueError(f"grad_clip max_norm must be > 0, got {max_norm}")

    def update(g: Tensor | None, state: Any, at: StepInput) -> tuple[Tensor, Any, StepMetrics]:
        if g is None:
            raise ValueError("clip_grad has no gradient to clip: put it after the oracle")
        return g * (max_norm / g.norm().clamp_min(max_norm)), state, {}

    return LocalStep(name, init=lambda ctx: (), update=update)


class LocalChain(NamedTuple):
    """Steps applied in order, their states in a dict keyed by step name."""

    steps: tuple[LocalStep, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    @property
    def passes(self) -> int:
        return sum(s.passes for s in self.steps)

    def init(self, ctx: UpdateContext) -> dict[str, Any]:
        """Every step's state at the start of one client update, by step name."""
        return {s.name: s.init(ctx) for s in self.steps}

    def update(
        self, states: dict[str, Any], at: StepInput
    ) -> tuple[Tensor, dict[str, Any], StepMetrics]:
        """One local step through every step: ``(g [d], new states, merged metrics)``.

        Raises:
            KeyError: ``states`` lacks a step's state (it did not come from ``init``).
        """
        g: Tensor | None = None
        new: dict[str, Any] = {}
        metrics: StepMetrics = {}
        for s in self.steps:
            g, new[s.name], m = s.update(g, states[s.name], at)
            metrics.update(m)
        if g is None:
            raise ValueError(f"the local chain {list(self.names)} produced no gradient")
        return g, new, metrics

    def finish(self, states: dict[str, Any], end: StepEnd) -> tuple[State, State]:
        """The client's new persistent state (its old one with every step's entries merged
        in chain order) and the uplink extras.

        Raises:
            ValueError: two steps return one client-state or extra key (one would silently
                overwrite the other).
        """
        client_state = dict(end.ctx.client_state)
        extras: State = {}
        owner: dict[tuple[str, str], str] = {}
        for s in self.steps:
            new_state, ex = s.finish(states[s.name], end)
            for kind, keys in (("client state", new_state), ("extra", ex)):
                for k in keys:
                    other = owner.setdefault((kind, k), s.name)
                    if other != s.name:
                        raise ValueError(f"local steps {other!r} and {s.name!r} both return "
                                         f"the {kind} {k!r}")
            client_state.update(new_state)
            extras.update(ex)
        return client_state, extras


def chain(*steps: LocalStep) -> LocalChain:
    """The steps as one chain, applied in the order given.

    Raises:
        ValueError: two steps with one name, or an empty name.
    """
    names = [s.name for s in steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"local step names must be unique, got {dupes} twice in {names}")
    if not all(names):
        raise ValueError(f"local step names must be non-empty, got {names}")
    return LocalChain(tuple(steps))
