"""Deterministic system model: devices, network, availability and a simulated clock.

Pure functions over numpy arrays. Randomness comes only from the ``np.random.Generator``
passed in: the caller derives it from ``(seed, "system")`` for the per-run profiles and
from ``(seed, "system", round)`` for one round (``fedflat.rng.numpy_rng``). Every
function draws a fixed number of values whatever the configuration, so turning one
feature on does not shift the draws of another.

Timeline of one participant in a synchronous round (seconds from the round start)::

    download = downlink_latency + bytes_down / downlink_bandwidth
    compute  = steps_run * step_time,   step_time = work_samples / planned_steps / speed
    upload   = uplink_latency + bytes_up / uplink_bandwidth
    finish   = download + compute + upload

Outcomes, decided in this order:

1. Stragglers (FedProx, ``straggler_fraction``): ``round(fraction * m)`` participants
   drawn uniformly without replacement. Policy ``drop`` (FedAvg) discards them before
   they run; policy ``partial`` (FedProx) runs them for ``e`` of the ``E`` local epochs,
   ``e`` uniform in ``{1, ..., E-1}``: ``steps_run = max(1, floor(planned * e / E))``.
2. Deadline ``D``: under ``drop`` a participant with ``finish > D`` is late (discarded);
   under ``partial`` it runs as many whole steps as fit,
   ``floor((D - download - upload) / step_time)``, and is late only if not even one step
   fits.
3. Dropout: with probability ``dropout`` a participant fails at ``u * finish``,
   ``u ~ U(0, 1)``; its update is lost (a failure after the deadline is just lateness).

Round duration: the server waits for every participant it still expects, so the round
ends at the last finish of a completed client or the last failure of a dropped one; if a
deadline is set and some participant missed it (or was a discarded straggler), the
server waits until the deadline. The result is capped at the deadline. An empty round
lasts 0 s.

References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
    Heterogeneous Networks." MLSys 2020. https://arxiv.org/abs/1812.06127 (stragglers,
    §5 and code litian96/FedProx flearn/trainers/fedprox.py); Bonawitz et al. "Towards
    Federated Learning at Scale: System Design." MLSys 2019 (deadlines, dropout).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedflat.errors import ScenarioError
from fedflat.scenario.system import (
    AvailabilityTrace,
    ConstantDist,
    LogNormalDist,
    SystemConfig,
    TraceDist,
)

ArrayLike = float | int | Sequence[float] | np.ndarray

# Relative slack when counting how many whole steps fit in a time budget, so that a
# budget of exactly n steps is not lost to floating-point rounding.
_FIT_SLACK = 1e-9

_PROFILE_FIELDS = (
    "compute_speed",
    "downlink_bandwidth",
    "uplink_bandwidth",
    "downlink_latency",
    "uplink_latency",
)


@dataclass(frozen=True)
class Profiles:
    """Per-client system characteristics, drawn once per run.

    Attributes:
        compute_speed: [N] samples/second (``inf``: computing takes no time).
        downlink_bandwidth: [N] bytes/second (``inf``: unlimited).
        uplink_bandwidth: [N] bytes/second (``inf``: unlimited).
        downlink_latency: [N] seconds per download.
        uplink_latency: [N] seconds per upload.
        availability_trace: round -> (client ids [r], available [r] bool) from a trace
            file, or None when availability is a probability.
    """

    compute_speed: np.ndarray
    downlink_bandwidth: np.ndarray
    uplink_bandwidth: np.ndarray
    downlink_latency: np.ndarray
    uplink_latency: np.ndarray
    availability_trace: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_clients(self) -> int:
        """Population size N."""
        return int(self.compute_speed.shape[0])


@dataclass(frozen=True)
class RoundTiming:
    """What happened to each participant of one synchronous round (arrays aligned [m]).

    Attributes:
        client_ids: [m] participant ids, in the order given.
        download_s, compute_s, upload_s: [m] seconds; ``compute_s`` is the time of the
            steps actually run (of the planned steps for a late client under ``drop``,
            0 for a discarded straggler).
        finish_s: [m] download + compute + upload, from the round start.
        drop_s: [m] time of the mid-round failure (NaN if the client did not drop).
        completed: [m] the update arrives in time and counts.
        dropped: [m] failed mid-round (before the deadline).
        late: [m] missed the deadline (and did not drop).
        straggler: [m] chosen as a FedProx straggler (``straggler_fraction``).
        planned_steps: [m] local steps planned.
        steps_done: [m] local steps whose result counts (0 unless completed); the lead
            runs each completed client for exactly this many steps.
        work_fraction: [m] ``steps_done / planned_steps`` (1 for a completed client with
            nothing planned, 0 unless completed).
        duration_s: the round's length on the simulated clock.
    """

    client_ids: np.ndarray
    download_s: np.ndarray
    compute_s: np.ndarray
    upload_s: np.ndarray
    finish_s: np.ndarray
    drop_s: np.ndarray
    completed: np.ndarray
    dropped: np.ndarray
    late: np.ndarray
    straggler: np.ndarray
    planned_steps: np.ndarray
    steps_done: np.ndarray
    work_fraction: np.ndarray
    duration_s: float

    @property
    def completed_ids(self) -> np.ndarray:
        """Ids of the clients whose update counts, in participant order."""
        return self.client_ids[self.completed]


# ----------------------------------------------------------------------------- profiles


def _resolve(path: str, base_dir: str | Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


_VALUE_COLUMNS = ("client_id", "value")
_AVAILABILITY_COLUMNS = ("client_id", "round", "available")


def _read_rows(path: Path, columns: tuple[str, ...], key: str) -> list[tuple[int, list[float]]]:
    """(line number, numeric cells) of each data row of a CSV trace.

    A first row whose cells are not all numbers is a header and is skipped; blank lines are
    ignored. Errors name the trace file, its line and column (1-based) and ``key``.
    """
    ncols = len(columns)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            raw = [(reader.line_num, r) for r in reader if r and any(c.strip() for c in r)]
    except FileNotFoundError:
        raise ScenarioError(f"trace file not found: {path}", key=key) from None
    except IsADirectoryError:
        raise ScenarioError(f"trace path is a folder, not a CSV file: {path}", key=key) from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(
            f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at byte offset {exc.start} "
            "(a trace is a CSV text file)", file=str(path), key=key) from None
    except (OSError, csv.Error) as exc:
        raise ScenarioError(f"cannot read trace file {path}: {exc}", key=key) from None
    header = ",".join(columns)
    rows: list[tuple[int, list[float]]] = []
    for i, (lineno, r) in enumerate(raw):
        where = {"file": str(path), "key": key, "line": lineno}
        if len(r) != ncols:  # the column is the first missing (or first extra) one
            raise ScenarioError(f"expected {ncols} columns ({header}), got {len(r)}", **where,
                                column=min(len(r), ncols) + 1)
        if i == 0 and not any(_is_number(c) for c in r):
            continue  # a header row
        cells: list[float] = []
        for col, (name, cell) in enumerate(zip(columns, r, strict=True), start=1):
            if not _is_number(cell):
                raise ScenarioError(f"{name}: {cell.strip()!r} is not a number", **where,
                                    column=col)
            value = float(cell)
            if not math.isfinite(value):
                raise ScenarioError(f"{name}: {cell.strip()!r} is not a finite number", **where,
                                    column=col)
            cells.append(value)
        rows.append((lineno, cells))
    if not rows:
        raise ScenarioError(f"empty trace: no data rows (expected rows {header})",
                            file=str(path), key=key)
    return rows


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _integer(path: Path, key: str, lineno: int, column: int, name: str, x: float) -> int:
    if x != int(x) or x < 0:
        raise ScenarioError(f"{name} must be a non-negative integer, got {x:g}", file=str(path),
                            key=key, line=lineno, column=column)
    return int(x)


def _read_value_trace(
    path: Path, num_clients: int, key: str, *, positive: bool
) -> np.ndarray:
    rows = _read_rows(path, _VALUE_COLUMNS, key)
    values = np.full(num_clients, np.nan)
    for lineno, (cid_raw, value) in rows:
        cid = _integer(path, key, lineno, 1, "client_id", cid_raw)
        if (value <= 0) if positive else (value < 0):
            bound = "> 0 (a rate)" if positive else ">= 0"
            raise ScenarioError(f"value must be {bound}, got {value:g}", file=str(path),
                                key=key, line=lineno, column=2)
        if cid >= num_clients:
            continue  # a trace may describe a larger population
        if not np.isnan(values[cid]):
            raise ScenarioError(f"client {cid} listed twice", file=str(path), key=key,
                                line=lineno, column=1)
        values[cid] = value
    missing = np.flatnonzero(np.isnan(values))
    if missing.size:
        raise ScenarioError(
            f"no value for {missing.size} of {num_clients} clients "
            f"(first: {missing[:5].tolist()}); a value trace lists every client",
            file=str(path), key=key,
        )
    return values


def _read_availability_trace(
    path: Path, num_clients: int, key: str
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    rows = _read_rows(path, _AVAILABILITY_COLUMNS, key)
    by_round: dict[int, dict[int, bool]] = {}
    for lineno, (cid_raw, rnd_raw, avail) in rows:
        cid = _integer(path, key, lineno, 1, "client_id", cid_raw)
        rnd = _integer(path, key, lineno, 2, "round", rnd_raw)
        if avail not in (0.0, 1.0):
            raise ScenarioError(f"available must be 0 or 1, got {avail:g}", file=str(path),
                                key=key, line=lineno, column=3)
        if cid >= num_clients:
            continue
        entries = by_round.setdefault(rnd, {})
        if cid in entries:
            raise ScenarioError(f"client {cid} round {rnd} listed twice", file=str(path),
                                key=key, line=lineno, column=1)
        entries[cid] = bool(avail)
    return {
        r: (
            np.fromiter(e.keys(), dtype=np.int64, count=len(e)),
            np.fromiter(e.values(), dtype=bool, count=len(e)),
        )
        for r, e in by_round.items()
    }


def _draw(
    dist: ConstantDist | LogNormalDist | TraceDist | None,
    z: np.ndarray,
    *,
    key: str,
    base_dir: str | Path | None,
    default: float,
    positive: bool,
) -> np.ndarray:
    n = z.shape[0]
    if dist is None:
        return np.full(n, default)
    if isinstance(dist, ConstantDist):
        return np.full(n, float(dist.value))
    if isinstance(dist, LogNormalDist):
        # Mean-parameterised: E[exp(mu + sigma Z)] = exp(mu + sigma^2/2) = mean.
        mu = math.log(dist.mean) - dist.sigma**2 / 2.0
        return np.exp(mu + dist.sigma * z)
    return _read_value_trace(_resolve(dist.path, base_dir), n, key, positive=positive)


def client_profiles(
    num_clients: int,
    cfg: SystemConfig,
    rng: np.random.Generator,
    *,
    base_dir: str | Path | None = None,
) -> Profiles:
    """Draw every client's compute speed, bandwidths and latencies (once per run).

    Args:
        num_clients: population size N.
        cfg: the ``system:`` block.
        rng: generator for this purpose (e.g. ``numpy_rng(seed, "system")``); exactly
            ``5 * N`` standard normals are drawn whatever the configuration.
        base_dir: folder against which relative trace paths are resolved (the scenario
            file's folder).

    Returns:
        The profiles.

    Raises:
        ValueError: if ``num_clients < 1``.
        ScenarioError: on an unreadable or incomplete trace file.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    z = rng.standard_normal((len(_PROFILE_FIELDS), num_clients))
    arrays = {}
    for row, name in enumerate(_PROFILE_FIELDS):
        latency = name.endswith("latency")
        arrays[name] = _draw(
            getattr(cfg, name),
            z[row],
            key=f"system.{name}.path",
            base_dir=base_dir,
            default=0.0 if latency else math.inf,
            positive=not latency,
        )
    trace = None
    if isinstance(cfg.availability, AvailabilityTrace):
        trace = _read_availability_trace(
            _resolve(cfg.availability.path, base_dir),
            num_clients,
            "system.availability.path",
        )
    return Profiles(**arrays, availability_trace=trace)


# ------------------------------------------------------------------------- availability


def available(
    profiles: Profiles, cfg: SystemConfig, round: int, rng: np.random.Generator
) -> np.ndarray:
    """Which clients can be sampled in ``round`` (bool [N]).

    With a probability ``p``, each client is available independently with probability
    ``p``. With a trace, the trace's row for (client, round) decides, and pairs it does
    not list take the trace's ``missing`` state. ``N`` uniforms are drawn either way.
    """
    n = profiles.num_clients
    u = rng.random(n)
    if isinstance(cfg.availability, AvailabilityTrace):
        if profiles.availability_trace is None:
            raise ValueError(
                "cfg has an availability trace but profiles were built without"
            )
        mask = np.full(n, cfg.availability.missing == "available")
        ids, avail = profiles.availability_trace.get(
            int(round), (np.zeros(0, np.int64), np.zeros(0, bool))
        )
        mask[ids] = avail
        return mask
    return u < cfg.availability


# --------------------------------------------------------------------------- one round


def _per_client(value: ArrayLike, m: int, name: str) -> np.ndarray:
    arr = np.broadcast_to(np.asarray(value, dtype=np.float64), (m,)).astype(np.float64)
    if np.any(arr < 0) or np.any(np.isnan(arr)):
        raise ValueError(f"{name} must be >= 0 for every participant, got {arr}")
    return arr


def transfer_times(
    profiles: Profiles, clients: np.ndarray, bytes_down: ArrayLike, bytes_up: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Download and upload seconds for ``clients``: latency + bytes / bandwidth."""
    m = clients.shape[0]
    down = (
        profiles.downlink_latency[clients]
        + _per_client(bytes_down, m, "bytes_down")
        / profiles.downlink_bandwidth[clients]
    )
    up = (
        profiles.uplink_latency[clients]
        + _per_client(bytes_up, m, "bytes_up") / profiles.uplink_bandwidth[clients]
    )
    return down, up


def job_times(
    profiles: Profiles,
    clients: ArrayLike,
    work_samples: ArrayLike,
    bytes_down: ArrayLike,
    bytes_up: ArrayLike,
) -> np.ndarray:
    """Seconds from a client's start to its upload's end (no deadline, no failure).

    Used by asynchronous mode: pass ``clients = np.arange(N)`` to get the [N] array the
    scheduler needs.
    """
    ids = np.asarray(clients, dtype=np.int64).reshape(-1)
    down, up = transfer_times(profiles, ids, bytes_down, bytes_up)
    work = _per_client(work_samples, ids.shape[0], "work_samples")
    return down + work / profiles.compute_speed[ids] + up


def simulate_round(
    participants: ArrayLike,
    work_samples: ArrayLike,
    bytes_down: ArrayLike,
    bytes_up: ArrayLike,
    profiles: Profiles,
    cfg: SystemConfig,
    rng: np.random.Generator,
    *,
    work_steps: ArrayLike | None = None,
    local_epochs: int | None = None,
) -> RoundTiming:
    """Simulate one synchronous round on the clock (see the module docstring).

    Args:
        participants: [m] client ids sampled this round.
        work_samples: [m] (or scalar) samples each participant plans to process (e.g.
            ``E * n_i`` for E epochs).
        bytes_down: [m] or scalar bytes each participant downloads.
        bytes_up: [m] or scalar bytes each participant uploads
            (``codec.wire_nbytes(d)``).
        profiles: from :func:`client_profiles`.
        cfg: the ``system:`` block.
        rng: this round's generator (``numpy_rng(seed, "system", round)``); exactly
            ``3 m`` uniforms and one permutation of ``m`` are drawn.
        work_steps: [m] local steps planned (the granularity of partial work); None:
            one step per sample.
        local_epochs: E, needed when ``straggler_fraction > 0`` under ``partial``.

    Returns:
        The timing and outcome of each participant and the round duration.

    Raises:
        ValueError: on negative work/bytes, duplicate participants, or FedProx partial
            stragglers without ``local_epochs >= 2``.
    """
    ids = np.asarray(participants, dtype=np.int64).reshape(-1)
    m = ids.shape[0]
    if np.unique(ids).shape[0] != m:
        raise ValueError(f"participants must be distinct, got {ids.tolist()}")
    if m and (ids.min() < 0 or ids.max() >= profiles.num_clients):
        raise ValueError(f"participant ids must lie in [0, {profiles.num_clients})")
    work = _per_client(work_samples, m, "work_samples")
    planned = (
        np.ceil(work).astype(np.int64)
        if work_steps is None
        else _per_client(work_steps, m, "work_steps").astype(np.int64)
    )
    deadline = cfg.deadline_s
    partial = cfg.straggler_policy == "partial"

    # Fixed draws, whatever the configuration.
    u_drop = rng.random(m)
    u_when = rng.random(m)
    u_epochs = rng.random(m)
    order = rng.permutation(m)

    download, upload = transfer_times(profiles, ids, bytes_down, bytes_up)
    speed = profiles.compute_speed[ids]
    step_time = np.divide(work / speed, planned, out=np.zeros(m), where=planned > 0)

    # 1. FedProx stragglers (Python's round, as FedProx's `round(len * drop_percent)`).
    straggler = np.zeros(m, dtype=bool)
    straggler[order[: round(cfg.straggler_fraction * m)]] = True
    steps = planned.copy()
    discarded = np.zeros(m, dtype=bool)
    if straggler.any():
        if partial:
            if local_epochs is None or local_epochs < 2:
                raise ValueError(
                    "partial stragglers run a uniform number of epochs in {1..E-1}: "
                    f"local_epochs must be >= 2, got {local_epochs}"
                )
            epochs = 1 + np.floor(u_epochs * (local_epochs - 1)).astype(np.int64)
            reduced = np.maximum(1, (planned * epochs) // local_epochs)
            steps = np.where(straggler, np.minimum(planned, reduced), steps)
        else:
            discarded = straggler.copy()
            steps = np.where(discarded, 0, steps)

    # 2. Deadline.
    finish = download + steps * step_time + upload
    late = np.zeros(m, dtype=bool)
    if deadline is not None:
        over = ~discarded & (finish > deadline)
        if partial:
            budget = deadline - download - upload
            fit = np.floor(
                np.divide(
                    budget, step_time, out=np.full(m, np.inf), where=step_time > 0
                )
                * (1 + _FIT_SLACK)
            )
            fit = np.where(budget < 0, -1, fit)
            late = over & (fit < 1)
            cut = over & ~late
            steps = np.where(cut, np.minimum(steps, fit).astype(np.int64), steps)
            finish = download + steps * step_time + upload
        else:
            late = over

    # 3. Mid-round dropout (a failure after the deadline is only lateness).
    drop_time = u_when * finish
    dropped = ~discarded & (u_drop < cfg.dropout)
    if deadline is not None:
        dropped &= drop_time <= deadline
    late &= ~dropped
    completed = ~discarded & ~dropped & ~late
    drop_s = np.where(dropped, drop_time, np.nan)

    events = np.concatenate([finish[completed], drop_time[dropped]])
    duration = float(events.max()) if events.size else 0.0
    if deadline is not None:
        if (late | discarded).any():
            duration = deadline
        duration = min(duration, deadline)

    steps_done = np.where(completed, steps, 0)
    work_fraction = np.where(
        completed,
        np.divide(steps_done, planned, out=np.ones(m), where=planned > 0),
        0.0,
    )
    return RoundTiming(
        client_ids=ids,
        download_s=download,
        compute_s=steps * step_time,
        upload_s=upload,
        finish_s=finish,
        drop_s=drop_s,
        completed=completed,
        dropped=dropped,
        late=late,
        straggler=straggler,
        planned_steps=planned,
        steps_done=steps_done,
        work_fraction=work_fraction,
        duration_s=duration,
    )
