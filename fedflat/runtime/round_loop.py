"""One federated round, written once, over a transport that only moves data.

A round is ``begin_round -> states_for -> map_clients -> end_round`` (:func:`run_round`).
What differs between the serial, vectorised, Ray, Flower and SecAgg+ backends is only how
the client-update function reaches the jobs and how the results come back: that is a
:class:`Transport`. The server side is always a :class:`~fedflat.runtime.server_core.ServerCore`:
in this process (:class:`LocalBackend`) or inside the Ray server actor, which runs the same
:func:`run_round` so that the driver is not on the round's critical path.

It never imports Ray or Flower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from fedflat.client.update import ClientResult
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload

ClientState = dict[str, Tensor]


@dataclass
class Mapped:
    """What a transport brings back for one round's jobs.

    Attributes:
        results: one entry per job, in job order; None where the job's result was lost and
            the transport's failure policy left the client out of the round (``drop``).
        record: facts about the transport to add to the round's record (lost actors,
            failed replies, the SecAgg+ cohort size).
        secure_mean: SecAgg+ only: the securely aggregated weighted mean of the cohort's
            deltas. The server never sees an individual delta, so every result's delta is
            replaced by this mean before aggregation (the rule ``mean`` then returns it).
    """

    results: list[ClientResult | None]
    record: dict[str, Any] = field(default_factory=dict)
    secure_mean: Tensor | None = None


class Transport(Protocol):
    """Moves one round's work to the clients and the results back; decides no numbers."""

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        """Run the client update of every job and return the results.

        Args:
            payload: the round's broadcast (global model, versions, broadcast tensors).
            jobs: the round's jobs, in round order.
            states: ``states[i]`` is the persistent client state of ``jobs[i]``.

        Returns:
            The results in job order (a ``Mapped``); a transport that cannot deliver a
            result either raises or, under a drop policy, leaves a None and says why in
            ``Mapped.record``.
        """
        ...


def run_round(core: ServerCore, transport: Transport, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
    """Run round ``round_`` of ``jobs`` through ``transport`` and return its record.

    ``keep_versions`` (asynchronous mode): the model versions clients in flight still
    train from (see ``ServerCore.end_round``).
    """
    jobs = list(jobs)
    payload = core.begin_round(round_, sorted({j.version for j in jobs if j.version is not None}))
    states = core.states_for([j.client_id for j in jobs])
    mapped = transport.map_clients(payload, jobs, states)
    if len(mapped.results) != len(jobs):
        raise RuntimeError(f"round {round_}: the transport returned {len(mapped.results)} "
                           f"results for {len(jobs)} jobs")
    kept = [i for i, r in enumerate(mapped.results) if r is not None]
    results = [r for r in mapped.results if r is not None]
    if mapped.secure_mean is not None:
        results = [dataclasses.replace(r, delta=mapped.secure_mean) for r in results]
    rec = core.end_round(round_, [jobs[i] for i in kept], results, keep_versions)
    rec.update(mapped.record)
    return rec


class Backend(Protocol):
    """What the Runner (:mod:`fedflat.runtime.run`) drives: rounds and the server state.

    The server state is a ``ServerCore``'s; it lives in this process (``LocalBackend``)
    or in the Ray server actor (``RayBackend``).
    """

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        """Run one round (:func:`run_round`) and return its metrics record."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The server state a checkpoint holds (``ServerCore.state_dict``)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (resume)."""
        ...

    def final_params(self) -> Tensor:
        """The global model's flat parameters at the end of the run."""
        ...

    def final_buffers(self) -> Tensor:
        """The global BatchNorm statistics (empty when there are none)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for summary.json (where Ray actors ran, actors lost); may be empty."""
        ...

    def close(self) -> None:
        """Release what the backend started (actors, a Ray it started)."""
        ...


class LocalBackend:
    """A ``Backend`` whose ``ServerCore`` lives in this process, over any transport."""

    def __init__(self, core: ServerCore, transport: Transport) -> None:
        self.core = core
        self.transport = transport

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        return run_round(self.core, self.transport, round_, jobs, keep_versions)

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)

    def final_params(self) -> Tensor:
        return self.core.params

    def final_buffers(self) -> Tensor:
        return self.core.buffers

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class WorkerTransport:
    """The in-process transport: a ``ClientWorker`` runs the jobs one after another (or
    at once, through its vectorised chunk runner)."""

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        return Mapped(list(self.worker.run(payload, jobs, states)))
