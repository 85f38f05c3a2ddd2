"""Gradient oracles: what turns (parameters, batch) into the gradient the optimizer sees.

An oracle is a pair of pure functions (optax style). ``init`` builds the oracle's state at
the start of one client update; ``grad`` evaluates the model (through ``FlatModel``) and
returns the loss at the unperturbed point, the gradient to use, the new state and metrics.
SAM-type oracles wrap the model's plain loss/gradient; DP oracles replace it with clipped,
noised per-example gradients. The oracle becomes the first step of the local chain
(``fedflat.client.local_chain``: oracle -> corrections -> clip), whose output the base
optimizer takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from fedflat.models.flat import FlatModel

if TYPE_CHECKING:
    from fedflat.client.local_chain import StepEnd

Batch = tuple[Tensor, Tensor]  # (x, y); y is int64 class labels
Metrics = dict[str, float]


@dataclass
class UpdateContext:
    """What an oracle or correction may read about the current client update.

    Attributes:
        model: the flat model wrapper (its module is in train mode).
        x_global: the global flat parameters this client started from (do not mutate).
        round: the round index t (0-based).
        client_id: the client's id.
        num_samples: the client's number of training samples.
        broadcast: extra vectors the server sent this round, by name (e.g. the previous
            global update for FedLESAM); empty if none.
        client_state: this client's persistent state (read-only here; corrections return
            a new one at the end of the update).
    """

    model: FlatModel
    x_global: Tensor
    round: int
    client_id: int
    num_samples: int
    broadcast: dict[str, Tensor] = field(default_factory=dict)
    client_state: dict[str, Tensor] = field(default_factory=dict)


class Oracle(NamedTuple):
    """A gradient oracle.

    init(ctx) -> state
    grad(w, batch, state, gen, ctx) -> (loss, gradient, state, metrics)
    finish(state, end) -> (client state entries, uplink extras)   # optional

    ``loss`` is the mean mini-batch loss at ``w`` (a 0-d tensor; NaN for an empty batch),
    ``gradient`` a flat tensor like ``w``. ``w`` must not be mutated. ``finish`` (None: the
    oracle keeps no persistent state) is that of the chain step the oracle becomes
    (``fedflat.client.local_chain.oracle_step``).
    """

    init: Callable[[UpdateContext], Any]
    grad: Callable[
        [Tensor, Batch, Any, torch.Generator, UpdateContext],
        tuple[Tensor, Tensor, Any, Metrics],
    ]
    passes: int = 1  # forward+backward passes per step, for cost reports
    finish: Callable[[Any, StepEnd], tuple[dict[str, Tensor], dict[str, Tensor]]] | None = None


def plain() -> Oracle:
    """The ordinary mini-batch gradient (one pass)."""

    def grad(w: Tensor, batch: Batch, state: Any, gen: torch.Generator, ctx: UpdateContext):
        loss, g = ctx.model.loss_grad(w, *batch)
        return loss, g, state, {}

    return Oracle(init=lambda ctx: (), grad=grad, passes=1)
