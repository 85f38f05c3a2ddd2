"""The uplink chain: what a client does to its delta before the delta leaves the device.

Every step has one shape, optax's ``GradientTransformation`` made for a flat delta: a
name and two pure functions ::

    init(delta) -> state                       # the step's state before its first use
    update(delta, state, ctx) -> (delta, state, metrics)

``chain`` runs the steps in order, in the order the maths needs; with DP-FedSAM's
client-side noise (``fedflat.privacy.client_noise``) that is ::

    chain(clip_delta(C), gaussian_noise(σC/√m), encode(codec))

so that the noise is added to the clipped delta and the codec (with its error-feedback
residual) only ever sees the noisy one: everything the client sends, the residual
included, is then post-processing of a private vector.

State lives in the client's persistent state (``ClientResult.client_state``), one entry
per (step, field) under the key ``"uplink.<step>.<field>"``: keyed by step name, not by
position, so a checkpoint still resumes when a step is inserted (the new step starts from
its ``init``). Randomness comes from ``UplinkContext.stream(purpose)`` = ``fedflat.rng.
stream(seed, purpose, round, client_id)``: the same on every backend, worker and retry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fedflat.comm.codecs import Codec, ErrorFeedbackCodec, transmit
from fedflat.rng import stream

State = dict[str, Tensor]
Metrics = dict[str, float]

STATE_PREFIX = "uplink."
BYTES_KEY = "bytes_up"  # the metric ``encode`` reports: exact bytes of the message sent


@dataclass(frozen=True)
class UplinkContext:
    """Who is sending, as the integer path that seeds each step's random stream."""

    seed: int
    round: int
    client_id: int
    device: str | torch.device = "cpu"

    def stream(self, purpose: str) -> torch.Generator:
        """The generator of ``(seed, purpose, round, client_id)`` on the context's device."""
        return stream(self.seed, purpose, self.round, self.client_id, device=self.device)


class UplinkStep(NamedTuple):
    """One step of the uplink chain.

    Attributes:
        name: unique within a chain; names the step's state keys.
        init: ``init(delta) -> state`` (the step's state before its first use).
        update: ``update(delta [d], state, ctx) -> (delta [d], state, metrics)``; pure.
    """

    name: str
    init: Callable[[Tensor], State]
    update: Callable[[Tensor, State, UplinkContext], tuple[Tensor, State, Metrics]]


def state_key(step: str, field: str) -> str:
    """The client-state key of one field of one step's state."""
    return f"{STATE_PREFIX}{step}.{field}"


class UplinkChain(NamedTuple):
    """Steps applied in order; state keyed by step name (see the module docstring)."""

    steps: tuple[UplinkStep, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def update(
        self, delta: Tensor, client_state: Mapping[str, Tensor], ctx: UplinkContext
    ) -> tuple[Tensor, State, Metrics]:
        """Run every step on ``delta``.

        Args:
            delta: the client's flat delta [d] from the local update.
            client_state: the client's persistent state; only the ``"uplink."`` keys are
                read, and a step with none of its keys starts from its ``init``.
            ctx: the sender (seeds the steps' streams).

        Returns:
            ``(what the server receives [d], the chain's new state (``"uplink."`` keys
            only), the steps' metrics merged)``.

        Raises:
            ValueError: a state key of no step in the chain (a step was removed or
                renamed: that state would be lost silently).
        """
        own = {k: v for k, v in client_state.items() if k.startswith(STATE_PREFIX)}
        known = set(self.names)
        stray = sorted(k for k in own if k[len(STATE_PREFIX):].split(".", 1)[0] not in known)
        if stray:
            raise ValueError(f"client state has uplink keys {stray} of no step in the chain "
                             f"{list(self.names)}")
        new_state: State = {}
        metrics: Metrics = {}
        for step in self.steps:
            prefix = f"{STATE_PREFIX}{step.name}."
            sub = {k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}
            if not sub:
                sub = step.init(delta)
            delta, sub, m = step.update(delta, sub, ctx)
            new_state.update({state_key(step.name, f): v for f, v in sub.items()})
            metrics.update(m)
        return delta, new_state, metrics


def chain(*steps: UplinkStep) -> UplinkChain:
    """The steps as one chain, applied in the order given.

    Raises:
        ValueError: two steps with one name, or a name with a dot (state keys split on it).
    """
    names = [s.name for s in steps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"uplink step names must be unique, got {dupes} twice in {names}")
    dotted = [n for n in names if "." in n or not n]
    if dotted:
        raise ValueError(f"uplink step names must be non-empty and without '.', got {dotted}")
    return UplinkChain(tuple(steps))


def encode(codec: Codec | ErrorFeedbackCodec, *, name: str = "codec") -> UplinkStep:
    """The uplink codec as the chain's last step: the server receives the decoded vector.

    With error feedback the residual (what the codec left out, carried to the client's next
    update) is the step's state ``{"residual": [d]}``; a plain codec keeps no state. Draws
    come from the ``"codec"`` stream.

    Returns:
        An ``UplinkStep``; metrics ``bytes_up`` = the message's exact ``nbytes``.
    """

    def update(delta: Tensor, state: State, ctx: UplinkContext) -> tuple[Tensor, State, Metrics]:
        tx = transmit(codec, delta, state.get("residual"), ctx.stream("codec"))
        new = {} if tx.residual is None else {"residual": tx.residual}
        return tx.decoded, new, {BYTES_KEY: float(tx.nbytes)}

    return UplinkStep(name, init=lambda delta: {}, update=update)

