"""Backends move data and call the client and server code; they decide no numbers.

Every backend runs the round of :func:`fedflat.runtime.round_loop.run_round` over a
transport. ``SerialBackend`` is the in-process reference (a ``ClientWorker`` transport).
``RayBackend`` runs a pool of client actors (each training a chunk of the round's clients
with its model and data resident) and one server actor that owns the ``ServerCore`` and
runs ``run_round`` itself over ``ActorPool``, the transport that hands the chunks to the
client actors (the driver only asks for rounds and receives records). The round's payload
(global model and broadcast) is packed once; it travels inline up to Ray's inline limit and
through the object store, once, above it. Both return the same records for the same scenario.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedflat.client.update import ClientResult
from fedflat.errors import FedflatError, ScenarioError
from fedflat.runtime.build import FederatedData
from fedflat.runtime.round_loop import (
    Backend,
    ClientState,
    LocalBackend,
    Mapped,
    WorkerTransport,
    run_round,
)
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.shared_data import SharedData, share, unshare
from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload
from fedflat.scenario.schema import RuntimeConfig, Scenario


class SerialBackend(LocalBackend):
    """Everything in this process, clients one after another."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: torch.Tensor) -> None:
        self.worker = ClientWorker(sc, fed, threads=sc.runtime.threads)
        super().__init__(ServerCore(sc, fed, params), WorkerTransport(self.worker))


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
# A cluster fedflat did not start keeps its own system config; every Ray process reads this
# variable at start-up instead, so the driver and the actors get it through their environment.
INLINE_ENV = "RAY_max_direct_call_object_size"
INLINE_RUNTIME_ENV = {"env_vars": {INLINE_ENV: str(INLINE_BYTES)}}
MAX_CHUNK_RETRIES = 3  # fresh actors tried per chunk and round before the run fails
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class ClusterError(FedflatError):
    """The Ray cluster lost a part of the run it cannot replace (the server actor, or a
    client actor that keeps failing)."""


@dataclass
class ActorSpec:
    """How to (re)start client actor ``i``: its resources, runtime env and placement-group
    bundle. The server actor keeps it to replace a lost client actor in the same place."""

    options: dict[str, Any]
    args: tuple[Any, ...]  # (scenario, data ref, device, threads); the ref resolves in the actor
    placement_group: Any = None

    def spawn(self, i: int) -> Any:
        import ray

        opts = dict(self.options)
        if self.placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=i)
        return ray.remote(_ClientActor).options(**opts).remote(*self.args)


def _where() -> dict[str, Any]:
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


class ActorPool:
    """The Ray transport, run inside the server actor: each round's jobs go to the client
    actors in balanced chunks, directly from the server actor (the driver is not on the
    round's critical path). A client actor that dies is replaced from its ``ActorSpec``; its
    chunk is retried on the replacement (``on_actor_failure: retry``: a chunk's random
    streams are functions of (seed, round, client), so the retry returns what the lost actor
    would have) or its clients are left out of the round (``drop``)."""

    def __init__(self, policy: str, sizes: Sequence[int], inline_bytes: int = INLINE_BYTES,
                 spec: ActorSpec | None = None) -> None:
        self.policy = policy
        self.sizes = list(sizes)
        self.inline_bytes = inline_bytes
        self.spec = spec
        self.actors: list[Any] = []
        self.placement: list[dict[str, Any]] = []
        self.failures_total = 0

    def attach(self, actors: list[Any], placement: list[dict[str, Any]] | None = None) -> None:
        self.actors = list(actors)
        self.placement = [dict(p, actor=i, replaced=0)
                          for i, p in enumerate(placement or [{}] * len(actors))]

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        import ray

        jobs = list(jobs)
        chunks = balance_chunks(jobs, self.sizes, len(self.actors))
        # The payload is packed once. Up to the inline limit it travels inside each chunk's
        # task (measured: ~1 ms less per task than a stored object for a 68 KB model); above
        # it, Ray would store a copy per task, so it goes into the object store once.
        wire: Any = pack_payload(payload)
        if _nbytes(wire) > self.inline_bytes:
            wire = ray.put(wire)
        args = [(wire, [_arrays(states[i]) for i in c], [jobs[i] for i in c]) for c in chunks]
        refs = [self.actors[a].run.remote(*args[a]) for a in range(len(chunks))]
        results, failures = self._collect(payload.round, refs, args, chunks, jobs)
        record: dict[str, Any] = {}
        if failures:
            record["actor_failures"] = failures
            if self.policy == "drop":
                record["actor_dropped"] = [jobs[i].client_id for i, r in enumerate(results)
                                           if r is None]
        return Mapped(results, record)

    def _replace(self, a: int, err: Exception) -> None:
        """Start a fresh client actor in place of actor ``a`` (same resources and bundle)."""
        import ray

        if self.spec is None:
            raise ClusterError(f"client actor {a} died and cannot be replaced: {err}") from err
        actor = self.spec.spawn(a)
        try:
            where = ray.get(actor.where.remote(), timeout=300)
        except Exception as exc:
            raise ClusterError(f"client actor {a} died ({_reason(err)}) and no replacement "
                               f"could start: {_reason(exc)}") from exc
        self.actors[a] = actor
        old = self.placement[a]
        self.placement[a] = {**where, "actor": a, "replaced": old.get("replaced", 0) + 1}

    def _collect(self, round_: int, refs: list[Any], args: list[tuple[Any, ...]],
                 chunks: list[list[int]], jobs: list[ClientJob]
                 ) -> tuple[list[ClientResult | None], int]:
        """The chunk results, replacing lost actors; None where a chunk's clients were
        dropped. Returns the results by job position and the number of actor failures."""
        import ray
        from ray.exceptions import RayActorError

        results: list[ClientResult | None] = [None] * len(jobs)
        failures = 0
        for a, positions in enumerate(chunks):
            ref, tries = refs[a], 0
            while True:
                try:
                    packed = ray.get(ref)
                    break
                except RayActorError as err:
                    failures += 1
                    tries += 1
                    self._replace(a, err)
                    if self.policy == "drop":
                        packed = None
                        break
                    if tries > MAX_CHUNK_RETRIES:
                        raise ClusterError(
                            f"round {round_}: the chunk of clients "
                            f"{[jobs[i].client_id for i in positions]} lost {tries} client "
                            f"actors in a row (last: {_reason(err)})") from err
                    ref = self.actors[a].run.remote(*args[a])
            if packed is not None:
                for pos, r in zip(positions, unpack_results(packed), strict=True):
                    results[pos] = r
        self.failures_total += failures
        return results, failures


class _ServerActor:
    """Server actor body: a ServerCore running :func:`run_round` over an ``ActorPool``."""

    def __init__(self, sc: Scenario, fed: FederatedData | SharedData, params: torch.Tensor,
                 threads: int, inline_bytes: int = INLINE_BYTES,
                 spec: ActorSpec | None = None) -> None:
        fed = unshare(fed)
        self.core = ServerCore(sc, fed, params, threads=threads)
        self.pool = ActorPool(sc.runtime.on_actor_failure, fed.client_sizes().tolist(),
                              inline_bytes, spec)

    def where(self) -> dict[str, Any]:
        return _where()

    def attach(self, actors: list[Any], placement: list[dict[str, Any]] | None = None) -> None:
        self.pool.attach(actors, placement)

    def describe(self) -> dict[str, Any]:
        return {"ray_actors": self.pool.placement, "actor_failures": self.pool.failures_total}

    def step(self, round_: int, jobs: list[ClientJob],
             keep_versions: list[int] | None) -> dict[str, Any]:
        """Run round ``round_`` and return its record."""
        return run_round(self.core, self.pool, round_, jobs, keep_versions)

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state)

    def params(self) -> torch.Tensor:
        return self.core.params

    def buffers(self) -> torch.Tensor:
        return self.core.buffers


def _reason(exc: BaseException) -> str:
    """The first line of a Ray error (its full text repeats the actor's traceback)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
         "metrics": r.metrics, "message": _arrays(r.message)} for r in results]}


def unpack_results(wire: Wire) -> list[ClientResult]:
    deltas, buffers = _tensor(wire["deltas"]), _tensor(wire["buffers"])
    return [ClientResult(client_id=c["client_id"], delta=deltas[i], num_samples=c["num_samples"],
                         train_loss=c["train_loss"], steps=c["steps"],
                         client_state=_tensors(c["client_state"]), extras=_tensors(c["extras"]),
                         metrics=c["metrics"], buffers=buffers[i],
                         message=_tensors(c["message"]))
            for i, c in enumerate(wire["clients"])]


class _ClientActor:
    def __init__(self, sc: Scenario, fed: FederatedData | SharedData, device: str,
                 threads: int) -> None:
        self.worker = ClientWorker(sc, unshare(fed), device=device, threads=threads)

    def where(self) -> dict[str, Any]:
        return _where()

    def run(self, payload: Wire, states: list[dict[str, Any]],
            jobs: list[ClientJob]) -> Wire:
        return pack_results(self.worker.run(unpack_payload(payload), jobs,
                                            [_tensors(s) for s in states]))


def check_resources(rt: RuntimeConfig, nodes: Sequence[dict[str, float]]) -> tuple[str, str] | None:
    """(key, message) when the cluster's alive nodes (their total resources) cannot hold
    ``num_actors`` client actors of ``num_cpus`` CPUs and ``num_gpus`` GPUs, else None.

    An actor must fit on one node, so the room is counted node by node.
    """
    n, c, g = rt.num_actors, rt.num_cpus, rt.num_gpus
    eps = 1e-9  # fractional GPUs: 4 × 0.25 fills one GPU exactly

    def room(node: dict[str, float]) -> int:
        k = math.floor(node.get("CPU", 0.0) / c + eps)
        if g > 0:
            k = min(k, math.floor(node.get("GPU", 0.0) / g + eps))
        return k

    fits = [room(node) for node in nodes]
    if rt.placement == "strict_spread":
        fits = [min(k, 1) for k in fits]
    if sum(fits) >= n:
        return None
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    gpu_short = g > 0 and (n * g > gpus + eps or all(
        math.floor(node.get("GPU", 0.0) / g + eps) < math.floor(node.get("CPU", 0.0) / c + eps)
        for node in nodes))
    spread = " on distinct nodes (placement: strict_spread)" if rt.placement == "strict_spread" \
        else ""
    msg = (f"{n} client actors of {c:g} CPU and {g:g} GPU each need {n * c:g} CPUs and "
           f"{n * g:g} GPUs{spread}; the Ray cluster offers {cpus:g} CPUs and {gpus:g} GPUs on "
           f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}, room for {sum(fits)} such "
           f"actor{'s' if sum(fits) != 1 else ''}; lower runtime.num_actors, num_cpus or "
           f"num_gpus, or add nodes")
    return ("runtime.num_gpus" if gpu_short else "runtime.num_actors"), msg


def cluster_address(rt: RuntimeConfig) -> str | None:
    """The cluster to join: runtime.address or RAY_ADDRESS; refuses the two disagreeing."""
    env = os.environ.get("RAY_ADDRESS") or None
    if rt.address and env and rt.address != env and rt.address != "auto":
        raise ScenarioError(f"is {rt.address!r} but the environment sets RAY_ADDRESS={env!r}; "
                            "unset RAY_ADDRESS or make the two agree", key="runtime.address")
    return rt.address or env


class RayBackend:
    """Client actors plus a server actor. Starts a local Ray unless one is running or an
    address is given (``runtime.address`` or ``RAY_ADDRESS``); shuts down only what it
    started. Refuses, before any actor starts, a cluster that cannot hold the actors.
    A Ray the caller initialised keeps the caller's settings (its inline limit included:
    a dedicated worker environment per actor would cost ~2 s of start-up each)."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: torch.Tensor,
                 inline_bytes: int = INLINE_BYTES) -> None:
        """``inline_bytes``: payloads up to this size travel inside each task, larger ones
        are stored once per round."""
        import ray

        self.ray = ray
        rt = sc.runtime
        self._started = False
        self._server_lost: str | None = None
        self.placement_group: Any = None
        runtime_env: dict[str, Any] | None = None
        if not ray.is_initialized():
            # Ray warns on every start that it will stop overriding CUDA_VISIBLE_DEVICES for
            # actors with num_gpus=0; opting in now is harmless (such actors train on "cpu")
            # and leaves the console to fedflat's own lines.
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            address = cluster_address(rt)
            if address:
                # A cluster started elsewhere keeps Ray's 100 KB inline limit unless each of
                # our processes (this driver, the actors) reads it from its environment.
                os.environ.setdefault(INLINE_ENV, str(INLINE_BYTES))
                runtime_env = INLINE_RUNTIME_ENV
                try:
                    ray.init(address=address, log_to_driver=False, configure_logging=False)
                except Exception as exc:  # ConnectionError, or a malformed address
                    src = "runtime.address" if rt.address else "RAY_ADDRESS"
                    raise ScenarioError(f"cannot join the Ray cluster at {address!r} (from "
                                        f"{src}): {_reason(exc)}", key="runtime.address") from None
            else:
                ray.init(num_cpus=max(1, math.ceil(rt.num_actors * rt.num_cpus)),
                         num_gpus=math.ceil(rt.num_actors * rt.num_gpus) if rt.num_gpus else 0,
                         include_dashboard=False, log_to_driver=False,
                         configure_logging=False, _system_config=RAY_SYSTEM_CONFIG)
            self._started = True
        try:
            self._setup(sc, fed, params, inline_bytes, runtime_env)
        except BaseException:
            self.close()
            raise

    def _setup(self, sc: Scenario, fed: FederatedData, params: torch.Tensor, inline_bytes: int,
               runtime_env: dict[str, Any] | None) -> None:
        ray, rt = self.ray, sc.runtime
        problem = check_resources(rt, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if problem is not None:
            raise ScenarioError(problem[1], key=problem[0])
        threads = max(1, math.ceil(rt.num_cpus))
        device = "cuda" if rt.num_gpus > 0 else "cpu"
        # Stored once as numpy and CSR index lists: every actor on a node reads the arrays
        # from the shared object store without a copy, and unpickles 2 index arrays, not N.
        fed_ref = ray.put(share(fed))
        options: dict[str, Any] = {"num_cpus": rt.num_cpus, "num_gpus": rt.num_gpus}
        if runtime_env is not None:
            options["runtime_env"] = runtime_env
        if rt.placement != "none":
            from ray.util import placement_group

            bundle = {"CPU": rt.num_cpus, **({"GPU": rt.num_gpus} if rt.num_gpus else {})}
            self.placement_group = placement_group([bundle] * rt.num_actors,
                                                   strategy=PLACEMENT_STRATEGIES[rt.placement])
            self._wait([self.placement_group.ready()], "the placement group's "
                       f"{rt.num_actors} bundles ({rt.placement})")
        spec = ActorSpec(options, (sc, fed_ref, device, threads), self.placement_group)
        server_cls = ray.remote(num_cpus=0)(_ServerActor)
        if runtime_env is not None:
            server_cls = server_cls.options(runtime_env=runtime_env)
        self.server = server_cls.remote(sc, fed_ref, params, threads, inline_bytes, spec)
        self.actors = [spec.spawn(i) for i in range(rt.num_actors)]
        # Surface construction errors now, and say so when the cluster makes us wait.
        where = [a.where.remote() for a in self.actors]
        self._wait([*where, self.server.where.remote()], f"{rt.num_actors} client actors "
                   f"({rt.num_cpus:g} CPU, {rt.num_gpus:g} GPU each) and the server actor")
        #: where each client actor runs at the start: node id and process id
        self.placement: list[dict[str, Any]] = ray.get(where)
        self.server_placement: dict[str, Any] = ray.get(self.server.where.remote())
        ray.get(self.server.attach.remote(self.actors, self.placement))

    def _wait(self, refs: list[Any], what: str) -> None:
        """Wait for ``refs``, printing one line each 60 s that the cluster is still busy
        (a feasible request can still wait for resources other jobs hold)."""
        pending = refs
        while True:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=60)
            if not pending:
                break
            print(f"fedflat: still waiting for Ray to place {what}; available now: "
                  f"{self.ray.available_resources()}", file=sys.stderr, flush=True)
        self.ray.get(refs)

    def _call(self, what: str, method: Any, *args: Any) -> Any:
        """Call the server actor; its death ends the run with a clear error (the last
        checkpoint stays valid: it is written only after a complete round)."""
        from ray.exceptions import RayActorError

        if self._server_lost is not None:
            raise ClusterError(self._server_lost)
        try:
            return self.ray.get(method.remote(*args))
        except RayActorError as exc:
            self._server_lost = (
                f"the Ray server actor died {what} ({_reason(exc)}); the run stops here; the "
                "last checkpoint in the run folder is intact: continue with "
                "'fedflat resume RUN_DIR'")
            raise ClusterError(self._server_lost) from None

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        keep = list(keep_versions) if keep_versions is not None else None
        return self._call(f"in round {round_}", self.server.step, round_, list(jobs), keep)

    def state_dict(self) -> dict[str, Any]:
        return self._call("while saving a checkpoint", self.server.state_dict)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._call("while loading a checkpoint", self.server.load_state_dict, state)

    def final_params(self) -> torch.Tensor:
        if self._server_lost is not None:
            return torch.zeros(0)  # the run failed; its checkpoints hold the last model
        return self._call("at the end of the run", self.server.params)

    def final_buffers(self) -> torch.Tensor:
        if self._server_lost is not None:
            return torch.zeros(0)
        return self._call("at the end of the run", self.server.buffers)

    def describe(self) -> dict[str, Any]:
        """For summary.json: where each client actor ran (Ray node id, pid, how often it was
        replaced), the server actor's node, and the client actors lost in the run."""
        info: dict[str, Any] = {"ray_server": getattr(self, "server_placement", None)}
        if self._server_lost is None and hasattr(self, "server"):
            with contextlib.suppress(Exception):
                info.update(self.ray.get(self.server.describe.remote(), timeout=60))
                return info
        info["ray_actors"] = [dict(p, actor=i) for i, p in
                              enumerate(getattr(self, "placement", []))]
        return info

    def close(self) -> None:
        # Replacement client actors belong to the server actor and end with it.
        for a in [*getattr(self, "actors", []), *([self.server] if hasattr(self, "server")
                                                 else [])]:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                from ray.util import remove_placement_group

                remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_backend(sc: Scenario, fed: FederatedData, params: torch.Tensor) -> Backend:
    if sc.runtime.backend == "ray":
        return RayBackend(sc, fed, params)
    # serial and vmap: the worker of a vmap run trains each round through its ChunkRunner
    return SerialBackend(sc, fed, params)
