"""Backends move data and call the client and server code; they decide no numbers.

``SerialBackend`` is the in-process reference. ``RayBackend`` runs a pool of client actors
(each training a chunk of the round's clients with its model and data resident) and one
server actor that owns the global state and hands each round's chunks to the client actors
itself (the driver only asks for rounds and receives records). The round's payload (global
model and broadcast) is packed once; it travels inline up to Ray's inline limit and through the
object store, once, above it. Both return the same records for the same scenario.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from fedflat.client.update import ClientResult
from fedflat.runtime.build import FederatedData
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload
from fedflat.scenario.schema import Scenario

Following = tuple[int, Sequence[ClientJob]] | None  # the next round's (index, jobs), if known


class Backend(Protocol):
    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None,
              following: Following = None) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def final_params(self) -> torch.Tensor: ...
    def final_buffers(self) -> torch.Tensor: ...
    def close(self) -> None: ...


class CoreBackend:
    """A backend whose server side is a ``ServerCore`` in this process (``self.core``):
    serial, and the Flower grid backends."""

    core: ServerCore

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)

    def final_params(self) -> torch.Tensor:
        return self.core.params

    def final_buffers(self) -> torch.Tensor:
        return self.core.buffers

    def close(self) -> None:
        pass


class SerialBackend(CoreBackend):
    """Everything in this process, clients one after another."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: torch.Tensor) -> None:
        self.worker = ClientWorker(sc, fed, threads=sc.runtime.threads)
        self.core = ServerCore(sc, fed, params)

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None,
              following: Following = None) -> dict[str, Any]:
        payload = self.core.begin_round(round_, _versions(jobs))
        states = self.core.states_for([j.client_id for j in jobs])
        results = self.worker.run(payload, jobs, states)
        return self.core.end_round(round_, jobs, results, keep_versions)


class VmapBackend(SerialBackend):
    """In-process, every client of the round trained at once (``runtime.backend: vmap``):
    ``SerialBackend`` whose worker runs its jobs through
    ``fedflat.runtime.vmap_backend.ChunkRunner`` (the worker chooses it from the scenario;
    this class lives here so that ``vmap_backend`` need not import the backends)."""


def _versions(jobs: Sequence[ClientJob]) -> list[int]:
    return sorted({j.version for j in jobs if j.version is not None})


def balance_chunks(jobs: Sequence[ClientJob], sizes: Sequence[int], k: int) -> list[list[int]]:
    """Split job positions into ≤ k chunks of similar work (longest-processing-time first).

    Deterministic; each chunk keeps its jobs in round order. Empty chunks are dropped.
    """
    order = sorted(range(len(jobs)), key=lambda i: (-sizes[jobs[i].client_id], i))
    loads = [0] * k
    chunks: list[list[int]] = [[] for _ in range(k)]
    for i in order:
        a = min(range(k), key=lambda j: (loads[j], j))
        chunks[a].append(i)
        loads[a] += sizes[jobs[i].client_id]
    return [sorted(c) for c in chunks if c]


# Deltas, payloads and chunk results of a few MB go back inline in the task reply instead of
# through the shared-memory store: measured here, returning a [5, 16920] float32 chunk costs
# ~0.7 ms inline against ~3 ms through the store (Ray's default inlines only < 100 KB).
INLINE_BYTES = 8 * 1024 * 1024
RAY_SYSTEM_CONFIG = {"max_direct_call_object_size": INLINE_BYTES}


class _ServerActor:
    """Server actor body: a ServerCore that sends the round's work to the client actors
    itself, so that payloads and results travel server <-> client actor directly (the
    driver is not on the round's critical path)."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: torch.Tensor, threads: int,
                 inline_bytes: int = INLINE_BYTES) -> None:
        self.core = ServerCore(sc, fed, params, threads=threads)
        self.inline_bytes = inline_bytes
        self.actors: list[Any] = []
        self._pending: tuple[int, list[ClientJob], list[list[int]], list[Any]] | None = None

    def attach(self, actors: list[Any]) -> None:
        self.actors = list(actors)

    def _submit(self, round_: int, jobs: list[ClientJob], chunks: list[list[int]]) -> list[Any]:
        import ray

        # The payload is packed once. Up to the inline limit it travels inside each chunk's
        # task (measured: ~1 ms less per task than a stored object for a 68 KB model); above
        # it, Ray would store a copy per task, so it goes into the object store once.
        payload: Any = pack_payload(self.core.begin_round(round_, _versions(jobs)))
        if _nbytes(payload) > self.inline_bytes:
            payload = ray.put(payload)
        return [actor.run.remote(payload, [_arrays(s) for s in self.core.states_for(
                    [jobs[i].client_id for i in c])], [jobs[i] for i in c])
                for actor, c in zip(self.actors, chunks, strict=False)]

    def step(self, round_: int, jobs: list[ClientJob], chunks: list[list[int]],
             keep_versions: list[int] | None,
             following: tuple[int, list[ClientJob], list[list[int]]] | None) -> dict[str, Any]:
        """Run round ``round_`` and return its record. With ``following`` (round t+1's jobs
        and chunks) the next round's client work is sent out before returning, so that it
        runs while the driver records round t."""
        import ray

        pending, self._pending = self._pending, None
        if pending is not None and pending[:3] == (round_, jobs, chunks):
            refs = pending[3]  # sent out while round t-1 was being recorded
        else:
            refs = self._submit(round_, jobs, chunks)
        results: list[ClientResult | None] = [None] * len(jobs)
        for positions, packed in zip(chunks, ray.get(refs), strict=True):
            for pos, r in zip(positions, unpack_results(packed), strict=True):
                results[pos] = r
        rec = self.core.end_round(round_, jobs, [r for r in results if r is not None],
                                  keep_versions)
        if following is not None:
            t1, jobs1, chunks1 = following
            self._pending = (t1, jobs1, chunks1, self._submit(t1, jobs1, chunks1))
        return rec

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        self.core.load_state_dict(state)

    def params(self) -> torch.Tensor:
        return self.core.params

    def buffers(self) -> torch.Tensor:
        return self.core.buffers


# What crosses process boundaries is numpy and plain Python: Ray serialises a numpy array
# with a zero-copy buffer, while each torch tensor goes through torch's own pickling (measured
# here: echoing a 68 KB tensor through an actor 2.3 ms, the same numpy array 1.3 ms).
Wire = dict[str, Any]


def _array(t: torch.Tensor) -> np.ndarray | torch.Tensor:
    t = t.detach().cpu()
    return t if t.dtype == torch.bfloat16 else t.numpy()  # numpy has no bfloat16


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(a)) if isinstance(a, np.ndarray) else a  # writable copy


def _arrays(tensors: dict[Any, torch.Tensor]) -> dict[Any, np.ndarray | torch.Tensor]:
    return {k: _array(v) for k, v in tensors.items()}


def _tensors(arrays: dict[Any, np.ndarray | torch.Tensor]) -> dict[Any, torch.Tensor]:
    return {k: _tensor(v) for k, v in arrays.items()}


def _nbytes(wire: Wire) -> int:
    arrays = [wire["params"], wire["buffers"], *wire["broadcast"].values(),
              *wire["versions"].values(), *wire["buffer_versions"].values()]
    return sum(a.nbytes for a in arrays)


def pack_payload(payload: RoundPayload) -> Wire:
    return {"round": payload.round, "params": _array(payload.params),
            "broadcast": _arrays(payload.broadcast), "versions": _arrays(payload.versions),
            "buffers": _array(payload.buffers),
            "buffer_versions": _arrays(payload.buffer_versions)}


def unpack_payload(wire: Wire) -> RoundPayload:
    return RoundPayload(round=wire["round"], params=_tensor(wire["params"]),
                        broadcast=_tensors(wire["broadcast"]), versions=_tensors(wire["versions"]),
                        buffers=_tensor(wire["buffers"]),
                        buffer_versions=_tensors(wire["buffer_versions"]))


def pack_results(results: list[ClientResult]) -> Wire:
    """A chunk's deltas as one [k, d] array (one buffer), its BatchNorm statistics as one
    [k, b] array, plus plain per-client records."""
    deltas = _array(torch.stack([r.delta for r in results])) if results \
        else np.zeros((0, 0), dtype=np.float32)
    buffers = _array(torch.stack([r.buffers for r in results])) if results \
        else np.zeros((0, 0), dtype=np.float32)
    return {"deltas": deltas, "buffers": buffers, "clients": [
        {"client_id": r.client_id, "num_samples": r.num_samples, "train_loss": r.train_loss,
         "steps": r.steps, "client_state": _arrays(r.client_state), "extras": _arrays(r.extras),
         "metrics": r.metrics} for r in results]}


def unpack_results(wire: Wire) -> list[ClientResult]:
    deltas, buffers = _tensor(wire["deltas"]), _tensor(wire["buffers"])
    return [ClientResult(client_id=c["client_id"], delta=deltas[i], num_samples=c["num_samples"],
                         train_loss=c["train_loss"], steps=c["steps"],
                         client_state=_tensors(c["client_state"]), extras=_tensors(c["extras"]),
                         metrics=c["metrics"], buffers=buffers[i])
            for i, c in enumerate(wire["clients"])]


class _ClientActor:
    def __init__(self, sc: Scenario, fed: FederatedData, device: str, threads: int) -> None:
        self.worker = ClientWorker(sc, fed, device=device, threads=threads)

    def run(self, payload: Wire, states: list[dict[str, Any]],
            jobs: list[ClientJob]) -> Wire:
        return pack_results(self.worker.run(unpack_payload(payload), jobs,
                                            [_tensors(s) for s in states]))


class RayBackend:
    """Client actors plus a server actor. Starts a local Ray unless one is running or an
    address is given; shuts down only what it started."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: torch.Tensor,
                 inline_bytes: int = INLINE_BYTES) -> None:
        """``inline_bytes``: payloads up to this size travel inside each task, larger ones
        are stored once per round."""
        import ray

        self.ray = ray
        rt = sc.runtime
        self._started = False
        if not ray.is_initialized():
            # Ray warns on every start that it will stop overriding CUDA_VISIBLE_DEVICES for
            # actors with num_gpus=0; opting in now is harmless (such actors train on "cpu")
            # and leaves the console to fedflat's own lines.
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            if rt.address:
                ray.init(address=rt.address, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, math.ceil(rt.num_actors * rt.num_cpus)),
                         num_gpus=math.ceil(rt.num_actors * rt.num_gpus) if rt.num_gpus else 0,
                         include_dashboard=False, log_to_driver=False,
                         configure_logging=False, _system_config=RAY_SYSTEM_CONFIG)
            self._started = True
        threads = max(1, math.ceil(rt.num_cpus))
        device = "cuda" if rt.num_gpus > 0 else "cpu"
        fed_ref = ray.put(fed)
        server_cls = ray.remote(num_cpus=0)(_ServerActor)
        client_cls = ray.remote(num_cpus=rt.num_cpus, num_gpus=rt.num_gpus)(_ClientActor)
        self.server = server_cls.remote(sc, fed_ref, params, threads, inline_bytes)
        self.actors = [client_cls.remote(sc, fed_ref, device, threads)
                       for _ in range(rt.num_actors)]
        self.sizes = fed.client_sizes().tolist()
        ray.get(self.server.attach.remote(self.actors))  # surface construction errors now

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None,
              following: Following = None) -> dict[str, Any]:
        jobs = list(jobs)
        keep = list(keep_versions) if keep_versions is not None else None
        chunks = balance_chunks(jobs, self.sizes, len(self.actors))
        nxt = None
        if following is not None:
            jobs1 = list(following[1])
            nxt = (following[0], jobs1, balance_chunks(jobs1, self.sizes, len(self.actors)))
        return self.ray.get(self.server.step.remote(round_, jobs, chunks, keep, nxt))

    def state_dict(self) -> dict[str, Any]:
        return self.ray.get(self.server.state_dict.remote())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ray.get(self.server.load_state_dict.remote(state))

    def final_params(self) -> torch.Tensor:
        return self.ray.get(self.server.params.remote())

    def final_buffers(self) -> torch.Tensor:
        return self.ray.get(self.server.buffers.remote())

    def close(self) -> None:
        for a in [*self.actors, self.server]:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_backend(sc: Scenario, fed: FederatedData, params: torch.Tensor) -> Backend:
    if sc.runtime.backend == "ray":
        return RayBackend(sc, fed, params)
    if sc.runtime.backend == "vmap":
        return VmapBackend(sc, fed, params)
    return SerialBackend(sc, fed, params)
