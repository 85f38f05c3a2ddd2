"""The server pipeline: an ordered chain of server steps applied to one round's deltas.

Each step is a pair of pure functions (optax style): ``init(params) -> state`` and
``apply(round, state, gen) -> (round, state, metrics)``. A ``ServerRound`` flows through
the chain: clipping and attacks edit ``deltas``; a rule fills ``aggregate``; central noise
edits ``aggregate``; the server optimizer fills ``new_params``; later steps (SWA, control
variates) may add to ``broadcast`` and ``eval_params``. Steps never draw from global RNGs:
randomness comes from the generator handed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch
from torch import Tensor

Metrics = dict[str, float]


@dataclass
class ServerRound:
    """One round's inputs and outputs as they move through the pipeline.

    Attributes:
        round: round index t (0-based).
        params: global flat parameters x_t the clients started from.
        deltas: [m, d] client deltas y_i - x_t (decoded), in the order of ``client_ids``.
        weights: [m] unnormalised aggregation weights (number of samples n_i).
        client_ids: participating client ids, aligned with ``deltas``.
        num_clients: population size N.
        extras: per-client extra uplink tensors, each stacked [m, ...] (e.g. SCAFFOLD dc).
        aggregate: the aggregated delta after the rule (None until a rule ran).
        new_params: x_{t+1} (None until the server optimizer ran).
        broadcast: vectors to send to clients next round, by name.
        eval_params: parameters to evaluate if different from new_params (e.g. SWA).
    """

    round: int
    params: Tensor
    deltas: Tensor
    weights: Tensor
    client_ids: list[int]
    num_clients: int
    extras: dict[str, Tensor] = field(default_factory=dict)
    aggregate: Tensor | None = None
    new_params: Tensor | None = None
    broadcast: dict[str, Tensor] = field(default_factory=dict)
    eval_params: Tensor | None = None

    def with_(self, **changes: Any) -> ServerRound:
        return replace(self, **changes)


class ServerStep(NamedTuple):
    """init(params) -> state; apply(round, state, gen) -> (round, state, metrics)."""

    name: str
    init: Callable[[Tensor], Any]
    apply: Callable[[ServerRound, Any, torch.Generator], tuple[ServerRound, Any, Metrics]]


class Pipeline:
    """An ordered chain of server steps with one state per step."""

    def __init__(self, steps: Sequence[ServerStep]) -> None:
        self.steps = tuple(steps)

    def init(self, params: Tensor) -> tuple[Any, ...]:
        return tuple(step.init(params) for step in self.steps)

    def apply(
        self, rnd: ServerRound, state: tuple[Any, ...], gen: torch.Generator
    ) -> tuple[ServerRound, tuple[Any, ...], Metrics]:
        if len(state) != len(self.steps):
            raise ValueError(
                f"server state has {len(state)} entries for {len(self.steps)} steps "
                f"({[s.name for s in self.steps]})"
            )
        metrics: Metrics = {}
        new_state = []
        for step, st in zip(self.steps, state, strict=True):
            rnd, st, m = step.apply(rnd, st, gen)
            new_state.append(st)
            metrics.update(m)
        if rnd.new_params is None:
            raise ValueError("server pipeline produced no new parameters (no optimizer step)")
        return rnd, tuple(new_state), metrics
