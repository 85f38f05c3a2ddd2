"""fedflat's round objects <-> Flower ``RecordDict`` (the content of a Flower ``Message``).

A train instruction carries one client's job: the round payload (flat global parameters,
or in asynchronous mode the model version the client starts from, the global BatchNorm
running statistics of that model, and the server broadcast), the client's persistent state
(SCAFFOLD control variates, error feedback, ...), the job's round, client id, learning rate
and step cap, and the resolved scenario so that the node builds the same model and local
rule as the server. A reply carries the ``ClientResult``: the flat delta, the client's final
BatchNorm statistics, the updated client state, the extras for the server pipeline and the
scalar fields.

Tensors travel in ``ArrayRecord`` s (numpy ``.npy`` bytes: float32 and every other numpy
dtype round-trip bit for bit), scalars in ``ConfigRecord`` / ``MetricRecord`` s. The
functions here are pure and never touch a network.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from fedflat.client.update import ClientResult
from fedflat.runtime.worker import ClientJob, RoundPayload

# Record names inside the RecordDict of a train instruction / reply. Part of the wire
# format: a SuperNode and a SuperLink running different fedflat versions must agree.
PARAMS = "fedflat.params"
BROADCAST = "fedflat.broadcast"
BUFFERS = "fedflat.buffers"
STATE = "fedflat.state"
JOB = "fedflat.job"
SCENARIO = "fedflat.scenario"
DELTA = "fedflat.delta"
EXTRAS = "fedflat.extras"
RESULT = "fedflat.result"
METRICS = "fedflat.metrics"
NODE = "fedflat.node"

WIRE_VERSION = 2  # 2: BatchNorm statistics (fedflat.buffers) both ways

T = TypeVar("T")


class MessageError(ValueError):
    """A message that does not hold what fedflat expects (wrong app, version or peer)."""


@dataclass(frozen=True)
class TrainInstruction:
    """Everything a node needs for one client update, decoded from a message."""

    payload: RoundPayload
    job: ClientJob
    state: dict[str, Tensor]
    scenario_yaml: str
    scenario_sha256: str


def scenario_digest(scenario_yaml: str) -> str:
    """SHA-256 of the resolved scenario text: the cache key of a node's worker."""
    return hashlib.sha256(scenario_yaml.encode()).hexdigest()


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Pack named tensors into an ArrayRecord (order kept, CPU copies, bits kept).

    Raises:
        MessageError: a dtype numpy cannot hold (bfloat16), named with its key.
    """
    rec = ArrayRecord()
    for key, t in tensors.items():
        if t.dtype == torch.bfloat16:
            raise MessageError(f"tensor {key!r} has dtype bfloat16, which Flower's ArrayRecord "
                               "(numpy .npy bytes) cannot carry; cast it to float32 first")
        rec[key] = Array(t.detach().cpu().contiguous().numpy())
    return rec


def record_to_tensors(rec: ArrayRecord) -> dict[str, Tensor]:
    """Unpack an ArrayRecord into named CPU tensors (inverse of ``tensors_to_record``)."""
    return {key: torch.from_numpy(arr.numpy()) for key, arr in rec.items()}


def encode_instruction(payload: RoundPayload, job: ClientJob, state: Mapping[str, Tensor],
                       scenario_yaml: str, scenario_sha256: str | None = None) -> RecordDict:
    """The content of a train instruction for one client.

    Args:
        payload: the round's global parameters and broadcast.
        job: the client's job. In asynchronous mode (``job.version`` set) the message
            carries that model version as the parameters, not the latest model.
        state: the client's persistent state, ``{}`` before its first round.
        scenario_yaml: the resolved scenario text (``dump_scenario``).
        scenario_sha256: its digest, if already computed.

    Raises:
        MessageError: a job whose model version the payload lacks, or an unsupported dtype.
    """
    cfg: dict[str, int | float | str] = {
        "wire_version": WIRE_VERSION, "round": payload.round, "job_round": job.round,
        "client_id": job.client_id, "lr": float(job.lr),
    }
    # ConfigRecord has no None: an absent key means None.
    if job.max_steps is not None:
        cfg["max_steps"] = int(job.max_steps)
    if job.weight is not None:
        cfg["weight"] = float(job.weight)
    params, buffers = payload.params, payload.buffers
    if job.version is not None:  # asynchronous mode: only the model this client starts from
        if job.version not in payload.versions:
            raise MessageError(f"job of client {job.client_id} starts from model version "
                               f"{job.version}, which the payload lacks")
        cfg["version"] = int(job.version)
        params = payload.versions[job.version]
        buffers = payload.buffer_versions.get(job.version, buffers)
    sha = scenario_sha256 or scenario_digest(scenario_yaml)
    return RecordDict({
        PARAMS: tensors_to_record({"params": params}),
        BUFFERS: tensors_to_record({"buffers": buffers}),
        BROADCAST: tensors_to_record(payload.broadcast),
        STATE: tensors_to_record(state),
        JOB: ConfigRecord(cfg),
        SCENARIO: ConfigRecord({"yaml": scenario_yaml, "sha256": sha}),
    })


def decode_instruction(content: RecordDict) -> TrainInstruction:
    """Inverse of ``encode_instruction``.

    Raises:
        MessageError: a missing record or key, a wire-version mismatch, or a scenario whose
            digest does not match its text.
    """
    _require(content, (PARAMS, BUFFERS, BROADCAST, STATE, JOB, SCENARIO), "train instruction")
    cfg = content.config_records[JOB]
    version = cfg.get("wire_version")
    if version != WIRE_VERSION:
        raise MessageError(f"wire version {version} from the server, this node speaks "
                           f"{WIRE_VERSION}: run the same fedflat version on server and nodes")
    params = record_to_tensors(content.array_records[PARAMS])
    if "params" not in params:
        raise MessageError(f"record {PARAMS!r} lacks 'params'")
    job = ClientJob(round=config_int(cfg, "job_round"), client_id=config_int(cfg, "client_id"),
                    lr=config_float(cfg, "lr"),
                    max_steps=config_optional(cfg, "max_steps", config_int),
                    version=config_optional(cfg, "version", config_int),
                    weight=config_optional(cfg, "weight", config_float))
    x = params["params"]
    b = _one(content, BUFFERS, "buffers")
    payload = RoundPayload(round=config_int(cfg, "round"), params=x,
                           broadcast=record_to_tensors(content.array_records[BROADCAST]),
                           versions={} if job.version is None else {job.version: x},
                           buffers=b, buffer_versions={} if job.version is None or not b.numel()
                           else {job.version: b})
    scen = content.config_records[SCENARIO]
    text, sha = str(scen["yaml"]), str(scen["sha256"])
    if scenario_digest(text) != sha:
        raise MessageError("the scenario text does not match its SHA-256 digest")
    return TrainInstruction(payload=payload, job=job,
                            state=record_to_tensors(content.array_records[STATE]),
                            scenario_yaml=text, scenario_sha256=sha)


def encode_result(res: ClientResult) -> RecordDict:
    """The content of a train reply.

    ``train_loss`` may be NaN (a client whose every batch was empty); it travels as a
    float64 NaN and comes back as NaN.
    """
    scalars: dict[str, int | float] = {
        "client_id": int(res.client_id), "num_samples": int(res.num_samples),
        "train_loss": float(res.train_loss), "steps": int(res.steps),
    }
    return RecordDict({
        DELTA: tensors_to_record({"delta": res.delta}),
        BUFFERS: tensors_to_record({"buffers": res.buffers}),
        STATE: tensors_to_record(res.client_state),
        EXTRAS: tensors_to_record(res.extras),
        RESULT: MetricRecord(scalars),
        METRICS: MetricRecord({k: float(v) for k, v in res.metrics.items()}),
    })


def decode_result(content: RecordDict) -> ClientResult:
    """Inverse of ``encode_result``.

    Raises:
        MessageError: a missing record or key.
    """
    _require(content, (DELTA, BUFFERS, STATE, EXTRAS, RESULT, METRICS), "train reply")
    delta = record_to_tensors(content.array_records[DELTA])
    if "delta" not in delta:
        raise MessageError(f"record {DELTA!r} lacks 'delta'")
    s = content.metric_records[RESULT]
    missing = {"client_id", "num_samples", "train_loss", "steps"} - set(s)
    if missing:
        raise MessageError(f"record {RESULT!r} lacks {sorted(missing)}")
    loss = config_float(s, "train_loss")
    return ClientResult(
        client_id=config_int(s, "client_id"),
        delta=delta["delta"],
        num_samples=config_int(s, "num_samples"),
        train_loss=loss if not math.isnan(loss) else float("nan"),
        steps=config_int(s, "steps"),
        client_state=record_to_tensors(content.array_records[STATE]),
        extras=record_to_tensors(content.array_records[EXTRAS]),
        metrics={k: config_float(content.metric_records[METRICS], k)
                 for k in content.metric_records[METRICS]},
        buffers=_one(content, BUFFERS, "buffers"),
    )


def encode_node_info(partition_id: int | None, num_samples: int | None = None) -> RecordDict:
    """A node's answer to the server's query: which client it holds (-1: none)."""
    info: dict[str, int] = {"wire_version": WIRE_VERSION,
                            "partition_id": -1 if partition_id is None else int(partition_id)}
    if num_samples is not None:
        info["num_samples"] = int(num_samples)
    return RecordDict({NODE: ConfigRecord(info)})


def decode_node_info(content: RecordDict) -> int | None:
    """The partition id in a node's query reply (None: the node holds no client)."""
    _require(content, (NODE,), "node query reply")
    info = content.config_records[NODE]
    if info.get("wire_version") != WIRE_VERSION:
        raise MessageError(f"node speaks wire version {info.get('wire_version')}, the server "
                           f"{WIRE_VERSION}: run the same fedflat version on server and nodes")
    pid = config_int(info, "partition_id")
    return None if pid < 0 else pid


def _one(content: RecordDict, record: str, key: str) -> Tensor:
    tensors = record_to_tensors(content.array_records[record])
    if key not in tensors:
        raise MessageError(f"record {record!r} lacks {key!r}")
    return tensors[key]


def _require(content: RecordDict, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if n not in content]
    if missing:
        raise MessageError(f"{what} lacks records {missing}: is the peer a fedflat app of the "
                           "same version?")


def config_int(rec: Mapping[str, Any], key: str) -> int:
    """``rec[key]`` as an int; a missing or non-numeric value raises ``MessageError``."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{key!r} is {value!r}, expected a number")
    return int(value)


def config_float(rec: Mapping[str, Any], key: str) -> float:
    """``rec[key]`` as a float; a missing or non-numeric value raises ``MessageError``."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError(f"{key!r} is {value!r}, expected a number")
    return float(value)


def config_optional(rec: Mapping[str, Any], key: str,
                    conv: Callable[[Mapping[str, Any], str], T]) -> T | None:
    """An optional scalar: ConfigRecord has no None, so an absent key means None."""
    return None if key not in rec else conv(rec, key)
