"""Buffered asynchronous aggregation (FedBuff) on the simulated clock.

``concurrency`` clients train at once. Each job starts at simulated time ``t`` with the
server's current model version ``v`` and ends at ``t + job_time_s[client]`` (the
client's download + compute + upload time, see :func:`fedflat.comm.system.job_times`),
or fails earlier with probability ``dropout`` (at a uniform fraction of its duration;
the update is lost). Completed deltas go to a buffer; when it holds ``buffer_size`` (K)
deltas the server takes a step and the version becomes ``v + 1``. Whenever a job ends,
a new client is drawn uniformly among the idle ones (not in flight) and starts at once
with the version current at that moment (the new one if this completion filled the
buffer).

Events live in a heap keyed by ``(end_time, seq)``, ``seq`` being the global start
order, so ties resolve deterministically and the same generators give the same events.
The state is plain data (:meth:`AsyncState.to_dict` / :meth:`AsyncState.from_dict`).

The lead's loop::

    state = start(sched, N, job_time_s, numpy_rng(seed, "system", 0))
    while ...:
        jobs, state = next_buffer(sched, state, job_time_s,
                                  numpy_rng(seed, "system", state.version + 1))
        deltas = [client_update(models[j.start_version], j.client_id) for j in jobs]
        w = staleness_weights(sched, [j.staleness for j in jobs])
        x = x + server_lr * sum(w_i * delta_i) / K            # FedBuff, Algorithm 1

Each update gets its own ``w_i`` under either ``server.aggregation.weighting`` (the
staleness weight replaces the sample count n_i): ``samples`` passes the ``w_i`` to the
rule as weights and rescales its weighted mean by ``sum(w_i) / K``; ``uniform`` scales
the rows to ``w_i * delta_i`` before the unweighted rule (``fedflat.runtime.build``).
        models[state.version] = x; drop versions not in versions_in_use(state)

References:
    Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with
    Buffered Asynchronous Aggregation." AISTATS 2022. https://arxiv.org/abs/2106.06639
    (buffer, staleness weight 1/sqrt(1+s)); Xie, Koyejo, Gupta. "Asynchronous Federated
    Optimization." 2019. https://arxiv.org/abs/1903.03934 (polynomial and hinge
    staleness functions).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedflat.scenario.system import SystemConfig

StalenessKind = Literal["constant", "polynomial", "hinge"]
# One in-flight job: (end_s, seq, client_id, start_version, start_s, dropped).
Event = tuple[float, int, int, int, float, bool]


@dataclass(frozen=True)
class AsyncScheduler:
    """Hyperparameters of buffered asynchronous aggregation (build with the factory).

    Attributes:
        concurrency: clients in flight at any time.
        buffer_size: deltas K per server step.
        staleness: weighting kind (see :func:`staleness_weights`).
        staleness_a: polynomial exponent / hinge slope a.
        staleness_b: hinge threshold b (server steps).
        dropout: probability that a job fails before uploading.
    """

    concurrency: int
    buffer_size: int
    staleness: StalenessKind = "polynomial"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    dropout: float = 0.0


def async_scheduler(
    *,
    concurrency: int,
    buffer_size: int,
    staleness: StalenessKind = "polynomial",
    staleness_a: float = 0.5,
    staleness_b: float = 4.0,
    dropout: float = 0.0,
) -> AsyncScheduler:
    """Check and build an :class:`AsyncScheduler`.

    Raises:
        ValueError: naming the parameter, its bound and the value received.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if staleness not in ("constant", "polynomial", "hinge"):
        raise ValueError(
            f"staleness must be constant, polynomial or hinge, got {staleness!r}"
        )
    if staleness_a < 0:
        raise ValueError(f"staleness_a must be >= 0, got {staleness_a}")
    if staleness_b < 0:
        raise ValueError(f"staleness_b must be >= 0, got {staleness_b}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return AsyncScheduler(
        concurrency,
        buffer_size,
        staleness,
        float(staleness_a),
        float(staleness_b),
        dropout,
    )


def scheduler_from_config(cfg: SystemConfig) -> AsyncScheduler:
    """The scheduler a ``system:`` block with ``asynchronous:`` describes."""
    a = cfg.asynchronous
    if a is None:
        raise ValueError("system.asynchronous is not set (synchronous rounds)")
    return async_scheduler(
        concurrency=a.concurrency,
        buffer_size=a.buffer_size,
        staleness=a.staleness,
        staleness_a=a.staleness_a,
        staleness_b=a.staleness_b,
        dropout=cfg.dropout,
    )


@dataclass(frozen=True)
class Job:
    """One completed client job.

    Attributes:
        client_id: the client.
        seq: global start order (0, 1, ...); unique per job.
        start_version: model version the client downloaded (train from that model).
        start_s: simulated start time.
        end_s: simulated time the update arrived.
        staleness: server steps between its start and the step that aggregates it.
    """

    client_id: int
    seq: int
    start_version: int
    start_s: float
    end_s: float
    staleness: int


@dataclass(frozen=True)
class AsyncState:
    """Scheduler state; plain data, never mutated (functions return a new one).

    Attributes:
        num_clients: population size N.
        time_s: simulated time of the last event.
        version: server steps taken so far (the current model version).
        next_seq: ``seq`` of the next job to start.
        in_flight: heap of in-flight jobs (see ``Event``).
        completed_total: deltas delivered so far.
        dropped_total: jobs lost to dropout so far.
    """

    num_clients: int
    time_s: float
    version: int
    next_seq: int
    in_flight: tuple[Event, ...]
    completed_total: int = 0
    dropped_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form for checkpoints."""
        return {
            "num_clients": self.num_clients,
            "time_s": self.time_s,
            "version": self.version,
            "next_seq": self.next_seq,
            "in_flight": [list(e) for e in self.in_flight],
            "completed_total": self.completed_total,
            "dropped_total": self.dropped_total,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AsyncState:
        """Inverse of :meth:`to_dict`."""
        missing = {
            "num_clients",
            "time_s",
            "version",
            "next_seq",
            "in_flight",
            "completed_total",
            "dropped_total",
        } - set(d)
        if missing:
            raise ValueError(f"async scheduler state lacks keys {sorted(missing)}")
        events = tuple(
            (float(e[0]), int(e[1]), int(e[2]), int(e[3]), float(e[4]), bool(e[5]))
            for e in d["in_flight"]
        )
        return cls(
            num_clients=int(d["num_clients"]),
            time_s=float(d["time_s"]),
            version=int(d["version"]),
            next_seq=int(d["next_seq"]),
            in_flight=events,
            completed_total=int(d["completed_total"]),
            dropped_total=int(d["dropped_total"]),
        )


def versions_in_use(state: AsyncState) -> set[int]:
    """Model versions that in-flight jobs started from (the lead must keep these)."""
    return {e[3] for e in state.in_flight}


def _check_times(job_time_s: np.ndarray, n: int) -> np.ndarray:
    t = np.asarray(job_time_s, dtype=np.float64).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(
            f"job_time_s must have one entry per client ({n}), got {t.shape[0]}"
        )
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("job_time_s must be finite and >= 0 for every client")
    return t


def _launch(
    sched: AsyncScheduler,
    heap: list[Event],
    busy: np.ndarray,
    times: np.ndarray,
    now: float,
    version: int,
    seq: int,
    rng: np.random.Generator,
) -> None:
    # Three draws per launch, always: which idle client, whether it fails, when.
    idle = np.flatnonzero(~busy)
    pick = int(rng.integers(idle.shape[0]))
    u_drop, u_when = rng.random(2)
    cid = int(idle[pick])
    duration = float(times[cid])
    dropped = bool(u_drop < sched.dropout)
    end = now + (u_when * duration if dropped else duration)
    busy[cid] = True
    heapq.heappush(heap, (end, seq, cid, version, now, dropped))


def start(
    sched: AsyncScheduler,
    num_clients: int,
    job_time_s: np.ndarray,
    rng: np.random.Generator,
) -> AsyncState:
    """Launch ``concurrency`` jobs at time 0 with model version 0.

    Args:
        sched: the scheduler.
        num_clients: population size N (must be >= concurrency).
        job_time_s: [N] seconds per job of each client (``system.job_times``).
        rng: generator for the launches (e.g. ``numpy_rng(seed, "system", 0)``).

    Returns:
        The initial state.
    """
    if sched.concurrency > num_clients:
        raise ValueError(
            f"concurrency must be <= num_clients ({num_clients}), "
            f"got {sched.concurrency}"
        )
    times = _check_times(job_time_s, num_clients)
    heap: list[Event] = []
    busy = np.zeros(num_clients, dtype=bool)
    for seq in range(sched.concurrency):
        _launch(sched, heap, busy, times, 0.0, 0, seq, rng)
    return AsyncState(num_clients, 0.0, 0, sched.concurrency, tuple(heap))


def next_buffer(
    sched: AsyncScheduler,
    state: AsyncState,
    job_time_s: np.ndarray,
    rng: np.random.Generator,
) -> tuple[list[Job], AsyncState]:
    """Advance the clock until ``buffer_size`` deltas have arrived.

    Args:
        sched: the scheduler.
        state: current state (not modified).
        job_time_s: [N] seconds per job of each client.
        rng: generator for the replacement launches (e.g.
            ``numpy_rng(seed, "system", state.version + 1)``, so that a resumed run
            replays the same events).

    Returns:
        The K completed jobs in arrival order (aggregate them into version
        ``state.version + 1``, each weighted by ``staleness_weights``) and the new
        state, whose ``version`` is ``state.version + 1`` and ``time_s`` the K-th
        arrival.
    """
    times = _check_times(job_time_s, state.num_clients)
    heap = list(state.in_flight)
    busy = np.zeros(state.num_clients, dtype=bool)
    busy[[e[2] for e in heap]] = True
    version, seq, now = state.version, state.next_seq, state.time_s
    jobs: list[Job] = []
    dropped_total = state.dropped_total
    while len(jobs) < sched.buffer_size:
        end, jseq, cid, start_version, start_s, dropped = heapq.heappop(heap)
        now = end
        busy[cid] = False
        if dropped:
            dropped_total += 1
        else:
            jobs.append(
                Job(
                    cid,
                    jseq,
                    start_version,
                    start_s,
                    end,
                    state.version - start_version,
                )
            )
            if len(jobs) == sched.buffer_size:
                version += 1  # the server steps before the replacement downloads
        _launch(sched, heap, busy, times, now, version, seq, rng)
        seq += 1
    new_state = AsyncState(
        num_clients=state.num_clients,
        time_s=now,
        version=version,
        next_seq=seq,
        in_flight=tuple(heap),
        completed_total=state.completed_total + len(jobs),
        dropped_total=dropped_total,
    )
    return jobs, new_state


def staleness_weights(
    sched: AsyncScheduler, staleness: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Weight of each update given its staleness ``s`` (server steps).

    * constant: ``1``;
    * polynomial: ``(1 + s)^(-a)`` (FedBuff uses ``a = 1/2``);
    * hinge: ``1`` if ``s <= b`` else ``1 / (a (s - b) + 1)``.

    FedBuff sums ``w_i * delta_i`` over the buffer and divides by K (not by the sum of
    the weights), so stale deltas shrink the step.
    """
    s = np.asarray(staleness, dtype=np.float64)
    if np.any(s < 0):
        raise ValueError(f"staleness must be >= 0, got {s}")
    if sched.staleness == "constant":
        return np.ones_like(s)
    if sched.staleness == "polynomial":
        return (1.0 + s) ** (-sched.staleness_a)
    return np.where(
        s <= sched.staleness_b,
        1.0,
        1.0 / (sched.staleness_a * (s - sched.staleness_b) + 1.0),
    )
