"""fedflat rounds under Flower's SecAgg+ (legacy workflow): the server sees only the mean.

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS 2020) lets the server learn the sum of the cohort's vectors and nothing else about
any one of them. Flower 1.42 has it only in its legacy strategy API, so this path uses:

* nodes: a legacy ``ClientApp`` built from :class:`SecAggClient` (a ``NumPyClient``) with
  ``secaggplus_mod``. ``fit`` runs fedflat's ``ClientWorker.run`` for the client the node's
  ``partition-id`` names (the worker cache of :mod:`fedflat.flower.client_app`) and returns
  the flat delta Δ_i and the weight w_i (n_i = local samples with
  ``server.aggregation.weighting: samples``, 1 with ``uniform``). ``secaggplus_mod``
  then uploads ``[q(w_i / W), q(w_i / W · Δ_i)]`` masked (W = the largest n_i of the
  federation, Flower's ``max_weight``; q = stochastic quantisation to T levels on
  [-c, c]).
* server: :class:`CohortStrategy` (a legacy ``Strategy``) inside Flower's
  ``SecAggPlusWorkflow``, driven one round at a time by fedflat's ``Runner`` (seeded
  cohorts from ``sample_cohort``, metrics.jsonl, evaluation, checkpoints, summary.json).
  ``configure_fit`` sends exactly the Runner's cohort (client id -> node by
  ``partition-id``, asked once with a ``get_properties`` message); ``aggregate_fit``
  receives the unmasked ``Σ w_i Δ_i / Σ w_i`` (Flower divides the securely summed vector
  by the securely summed weights); :class:`SecAggTransport` returns it as the round's
  ``Mapped.secure_mean``, which fedflat's round (``round_loop.run_round``) puts in place
  of every client's delta before ``ServerCore.end_round``, so the rule ``mean`` returns
  it and the server
  optimizer (fedavg, fedavgm, fedadam, fedyogi, fedadagrad), server corrections without
  uplink extras, SWA, evaluation and sharpness run unchanged.

Only ``SecAggPlusWorkflow`` comes from Flower's ``DefaultWorkflow``: fedflat's ``Runner``
and ``run_round`` are the round loop (``DefaultWorkflow`` would replace its cohorts, metrics,
checkpoints, privacy planning and resume with Flower's own ``History``).

Precision: each coordinate of w_i/W·Δ_i is clipped to [-c, c] and stochastically rounded
to a grid of step 2c/T, so the mean the server gets differs from fedflat's weighted mean
by at most ``k · (2c/T) / Σ_i (w_i/W)`` per coordinate in a cohort of k (plus a relative
≤ W/(2 w_i T) from quantising the weights). Runs are not
bit-reproducible: Flower's quantiser uses NumPy's global generator and its neighbour
graph Python's ``random``. Scalars travel in the clear (n_i, train loss, steps, the
fraction of clipped coordinates): SecAgg+ hides the vectors only.

What can run under SecAgg+ (refused keys are named by :func:`secagg_refusals`):

=====================================  ========  ==========================================
scenario feature                       SecAgg+   why
=====================================  ========  ==========================================
rule ``mean`` (weighting samples or    yes       the weighted mean is a ratio of two sums
uniform)
server optimizers fedavg, fedavgm,     yes       they act on the mean only
fedadam, fedyogi, fedadagrad; SWA
local rules without uplink extras:     yes       purely local; their broadcast (FedLESAM's
SGD/Adam, FedProx, SAM, ASAM, ...,               previous global update) travels with the
FedLESAM                                         model as extra arrays
sample-level DP (DP-SGD, DP-SAT, ...)  yes       noise is added on the client
lossy downlink codecs                  yes       the server sends the decoded model
attack ``label_flip``                  yes       happens in the client's data
robust rules (median, trimmed_mean,    no        they need each client's delta
krum, multi_krum, bulyan,
geometric_median, centered_clipping),
bucketing
attacks sign_flip, scaling, alie, ipm  no        simulated on the server from the deltas
user-level DP, server noise            no        server-side clipping needs each delta's
(DP-FedAvg, adaptive clipping)                   norm
user-level DP, client noise            no        could run (clip + noise on the node) but
(DP-FedSAM)                                      fedflat applies it as a server step; not
                                                 wired
SCAFFOLD, FedDyn, FedSMOO, MoFedSAM,   no        per-client uplink extras and client
FedGamma                                         state (c_i, g_i, μ_i) would travel in the
                                                 clear or need a second secure sum
lossy uplink codecs (top_k, qsgd, ..)  no        SecAgg+ quantises itself; masks need
                                                 dense integer vectors
asynchronous rounds (FedBuff)          no        SecAgg+ sums one synchronous cohort
cohorts of fewer than 2 clients        no        nothing to hide a single delta in (the
                                                 round fails with a message)
client dropouts                        no        a failed reply aborts the run
=====================================  ========  ==========================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    FitIns,
    FitRes,
    GetPropertiesIns,
    MessageTypeLegacy,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid, ServerApp

from fedflat.client.update import ClientResult
from fedflat.flower import messages
from fedflat.flower.client_app import (
    ClientSettings,
    FlowerClientError,
    get_worker,
    node_partition,
)
from fedflat.flower.secagg_checks import (  # noqa: F401 - re-exported: SecAgg+ API in one place
    SERVER_SIDE_ATTACKS,
    check_secagg,
    flower_config,
    secagg_refusals,
)
from fedflat.flower.server_app import (
    FlowerRunError,
    ServerSettings,
    discover_nodes,
    run_over_transport,
)
from fedflat.runtime.build import FederatedData
from fedflat.runtime.driver import RunResult
from fedflat.runtime.round_loop import ClientState, Mapped
from fedflat.runtime.worker import ClientJob, RoundPayload
from fedflat.scenario.flower import SECAGG_MODULUS_RANGE
from fedflat.scenario.loader import dump_scenario
from fedflat.scenario.schema import Scenario

log = logging.getLogger("fedflat.flower")

# FitIns config keys (besides the job's, see _job_config).
_YAML, _SHA, _BROADCAST_KEYS = "fedflat.yaml", "fedflat.sha256", "fedflat.broadcast_keys"
_WEIGHT_MODE, _MAX_WEIGHT, _CLIP = "fedflat.weighting", "fedflat.max_weight", "fedflat.clip"
CLIPPED_METRIC = "secagg_clipped_fraction"


def max_weight(sc: Scenario, fed: FederatedData) -> float:
    """W, the largest client weight: max n_i (weighting samples) or 1 (uniform)."""
    if sc.server.aggregation.weighting == "uniform":
        return 1.0
    # the sizes, not the index lists: on-demand synthetic devices have no index lists
    return float(max(1, int(fed.client_sizes().max())))


# ---------------------------------------------------------------------- client side
class SecAggClient(NumPyClient):
    """A node's fedflat client as a legacy NumPyClient (wrapped by ``secaggplus_mod``)."""

    def __init__(self, ctx: Context, settings: ClientSettings) -> None:
        self.ctx = ctx
        self.settings = settings

    def get_properties(self, config: dict[str, Any]) -> dict[str, Any]:
        """The partition this node holds (-1: none): the server's client id -> node map."""
        pid = node_partition(self.ctx)
        return {"partition-id": -1 if pid is None else pid,
                "wire_version": messages.WIRE_VERSION}

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """Train this node's client from the sent model; return its delta and weight.

        Raises:
            FlowerClientError: a job for another partition, a model of another size, or a
                local rule that produced per-client state or uplink extras.
        """
        instr = decode_fit(parameters, config)
        pid = node_partition(self.ctx)
        if pid != instr.job.client_id:
            raise FlowerClientError(f"node holds partition {pid} but was sent the job of "
                                    f"client {instr.job.client_id}")
        worker = get_worker(instr, self.ctx, self.settings)
        if worker.model.num_params != instr.payload.params.numel():
            raise FlowerClientError(f"the node's model has {worker.model.num_params} "
                                    f"parameters, the server's {instr.payload.params.numel()}")
        [res] = worker.run(instr.payload, [instr.job], [{}])
        if res.client_state or res.extras:
            raise FlowerClientError(
                "under SecAgg+ a client may send only its delta; this local rule produced "
                f"client state {sorted(res.client_state)} and extras {sorted(res.extras)}")
        weight = 1 if config[_WEIGHT_MODE] == "uniform" else int(res.num_samples)
        delta = res.delta.detach().cpu().to(torch.float32).numpy()
        scaled = np.abs(delta) * (weight / float(config[_MAX_WEIGHT]))
        clipped = float(np.mean(scaled > float(config[_CLIP]))) if delta.size else 0.0
        metrics: dict[str, Any] = {k: float(v) for k, v in res.metrics.items()}
        metrics.update({"client_id": int(res.client_id), "num_samples": int(res.num_samples),
                        "train_loss": float(res.train_loss), "steps": int(res.steps),
                        CLIPPED_METRIC: clipped})
        return [delta], weight, metrics


def decode_fit(parameters: Sequence[np.ndarray], config: Mapping[str, Any]
               ) -> messages.TrainInstruction:
    """A fit call's arrays and config as a fedflat TrainInstruction (inverse of
    :func:`encode_fit`).

    Raises:
        messages.MessageError: a missing key, a wire-version mismatch or a scenario whose
            digest does not match its text.
    """
    if config.get("wire_version") != messages.WIRE_VERSION:
        raise messages.MessageError(f"wire version {config.get('wire_version')} from the "
                                    f"server, this node speaks {messages.WIRE_VERSION}")
    keys = [k for k in str(config.get(_BROADCAST_KEYS, "")).split("\n") if k]
    if len(parameters) != 1 + len(keys):
        raise messages.MessageError(f"fit sent {len(parameters)} arrays, expected 1 + "
                                    f"{len(keys)} broadcast tensors")
    text, sha = str(config[_YAML]), str(config[_SHA])
    if messages.scenario_digest(text) != sha:
        raise messages.MessageError("the scenario text does not match its SHA-256 digest")
    x = torch.from_numpy(np.array(parameters[0], copy=True))
    broadcast = {k: torch.from_numpy(np.array(a, copy=True))
                 for k, a in zip(keys, parameters[1:], strict=True)}
    job = ClientJob(round=messages.config_int(config, "job_round"),
                    client_id=messages.config_int(config, "client_id"),
                    lr=messages.config_float(config, "lr"),
                    max_steps=messages.config_optional(config, "max_steps", messages.config_int))
    payload = RoundPayload(round=messages.config_int(config, "round"), params=x,
                           broadcast=broadcast)
    return messages.TrainInstruction(payload=payload, job=job, state={}, scenario_yaml=text,
                                     scenario_sha256=sha)


def encode_fit(payload: RoundPayload, job: ClientJob, scenario_yaml: str, sha: str, *,
               weighting: str, max_weight_: float, clipping_range: float) -> FitIns:
    """One client's legacy FitIns: the model and broadcast as arrays, the job as config."""
    keys = sorted(payload.broadcast)
    arrays = [payload.params.detach().cpu().numpy()] + [
        payload.broadcast[k].detach().cpu().numpy() for k in keys]
    cfg: dict[str, Any] = {
        "wire_version": messages.WIRE_VERSION, "round": payload.round, "job_round": job.round,
        "client_id": job.client_id, "lr": float(job.lr), _YAML: scenario_yaml, _SHA: sha,
        _BROADCAST_KEYS: "\n".join(keys), _WEIGHT_MODE: weighting,
        _MAX_WEIGHT: float(max_weight_), _CLIP: float(clipping_range),
    }
    if job.max_steps is not None:
        cfg["max_steps"] = int(job.max_steps)
    return FitIns(parameters=ndarrays_to_parameters(arrays), config=cfg)


def make_secagg_client_app(settings: ClientSettings | None = None) -> ClientApp:
    """The legacy ClientApp of a SecAgg+ run: :class:`SecAggClient` under ``secaggplus_mod``."""
    s = settings or ClientSettings()

    def client_fn(context: Context) -> Any:
        return SecAggClient(context, s).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


# ---------------------------------------------------------------------- server side
class _RecordingGrid:
    """A Grid that remembers the error replies of Flower's workflow (it drops them)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.errors: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if m.has_error():
                self.errors.append(f"node {m.metadata.src_node_id}: {m.error.reason}")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class _Pending:
    """What the strategy needs for the round the workflow is running."""

    round: int
    jobs: list[ClientJob]
    instructions: list[tuple[ClientProxy, FitIns]]
    num_params: int


class CohortStrategy(Strategy):
    """A legacy Strategy that hands fedflat's cohort to SecAgg+ and keeps what comes back.

    ``configure_fit`` returns the instructions the transport prepared for fedflat's seeded
    cohort; ``aggregate_fit`` keeps the securely aggregated mean delta and each reply's
    clear-text scalars (``aggregated``) for fedflat's round, which aggregates them. Flower's
    workflow keeps no model: fedflat's ``ServerCore`` owns it, and evaluation is fedflat's.
    """

    def __init__(self) -> None:
        self.pending: _Pending | None = None
        self.aggregated: tuple[torch.Tensor, list[ClientResult]] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None  # fedflat's Runner initialises the model

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        return list(self.pending.instructions) if self.pending is not None else []

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Any]]:
        """Keep the securely aggregated mean and the cohort's results, in job order.

        Raises:
            FlowerRunError: failed replies (dropouts are not supported), or an aggregate
                of the wrong size.
        """
        if self.pending is None:
            raise FlowerRunError("aggregate_fit called without a pending round")
        if failures:
            raise FlowerRunError(f"SecAgg+ round {self.pending.round}: {len(failures)} failed "
                                 "replies: " + "; ".join(_failure_text(f) for f in failures))
        if not results:
            raise FlowerRunError(f"SecAgg+ round {self.pending.round}: no results")
        [mean] = parameters_to_ndarrays(results[0][1].parameters)[:1]
        delta = torch.from_numpy(np.asarray(mean, dtype=np.float32).copy())
        if delta.shape != (self.pending.num_params,):
            raise FlowerRunError(f"SecAgg+ aggregate of shape {tuple(delta.shape)}, expected "
                                 f"({self.pending.num_params},)")
        by_client = {}
        for _, fit in results:
            m = fit.metrics
            cid = int(m["client_id"])
            by_client[cid] = ClientResult(
                client_id=cid, delta=torch.zeros(0),  # hidden; Mapped.secure_mean stands in
                num_samples=int(m["num_samples"]),
                train_loss=float(m["train_loss"]), steps=int(m["steps"]),
                metrics={k: float(v) for k, v in m.items()
                         if k not in ("client_id", "num_samples", "train_loss", "steps")})
        missing = [j.client_id for j in self.pending.jobs if j.client_id not in by_client]
        if missing:
            raise FlowerRunError(f"SecAgg+ round {self.pending.round}: no result from "
                                 f"client(s) {missing}")
        self.aggregated = (delta, [by_client[j.client_id] for j in self.pending.jobs])
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[Any]:
        return []  # fedflat evaluates the global model on the server (ServerCore)

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters
                 ) -> tuple[float, dict[str, Any]] | None:
        return None


def _failure_text(f: Any) -> str:
    if isinstance(f, BaseException):
        return str(f)
    proxy, res = f
    return f"node {proxy.node_id}: {res.status.message}"


def _properties_query(node: int) -> Message:
    content = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
    return Message(RecordDict(content), dst_node_id=node,
                   message_type=MessageTypeLegacy.GET_PROPERTIES)


def _read_partition(reply: Message) -> int | None:
    """A ``get_properties`` reply's partition-id (-1: none), after the wire version."""
    props = compat.recorddict_to_getpropertiesres(reply.content).properties
    if props.get("wire_version") != messages.WIRE_VERSION:
        raise messages.MessageError(f"wire version {props.get('wire_version')}")
    pid = int(props.get("partition-id", -1))  # type: ignore[arg-type]
    return None if pid < 0 else pid


class SecAggTransport:
    """A fedflat transport whose every round is one SecAgg+ protocol run over Flower nodes:
    it returns the cohort's clear-text scalars and, as ``Mapped.secure_mean``, the
    securely aggregated mean delta (no individual delta reaches the server)."""

    def __init__(self, grid: Grid, context: Context, sc: Scenario, num_clients: int,
                 settings: ServerSettings, weight_bound: float) -> None:
        self.grid = _RecordingGrid(grid)
        self.num_clients = num_clients
        self.weighting = sc.server.aggregation.weighting
        self.settings = settings
        # The nodes get the scenario the Runner hands its workers (privacy noise calibrated).
        self.scenario_yaml = dump_scenario(sc)
        self.sha = messages.scenario_digest(self.scenario_yaml)
        self.fc = flower_config(sc)
        self.max_weight = weight_bound
        self.strategy = CohortStrategy()
        self.workflow = SecAggPlusWorkflow(
            num_shares=self.fc.secagg_num_shares,
            reconstruction_threshold=self.fc.secagg_reconstruction_threshold,
            max_weight=weight_bound, clipping_range=self.fc.secagg_clipping_range,
            quantization_range=self.fc.secagg_quantization_range,
            modulus_range=SECAGG_MODULUS_RANGE, timeout=settings.reply_timeout_s)
        self.legacy = LegacyContext(context, config=ServerConfig(num_rounds=sc.server.rounds),
                                    strategy=self.strategy, client_manager=SimpleClientManager())
        self.legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.START_TIME: time.time(), Key.CURRENT_ROUND: 0})
        self.node_of: dict[int, int] | None = None
        self.discovery_seconds = 0.0
        self.run_id = context.run_id

    def summary_facts(self) -> dict[str, Any]:
        fc = self.fc
        return {"node_discovery_seconds": self.discovery_seconds, "secagg": {
            "protocol": "SecAgg+ (Flower legacy SecAggPlusWorkflow)",
            "num_shares": fc.secagg_num_shares,
            "reconstruction_threshold": fc.secagg_reconstruction_threshold,
            "clipping_range": fc.secagg_clipping_range,
            "quantization_range": fc.secagg_quantization_range,
            "modulus_range": SECAGG_MODULUS_RANGE, "max_weight": self.max_weight,
            "weighting": self.weighting}}

    def connect(self) -> dict[int, int]:
        if self.node_of is None:
            t = time.perf_counter()
            self.node_of = discover_nodes(self.grid._grid, self.num_clients,
                                          timeout_s=self.settings.node_timeout_s,
                                          poll_s=self.settings.poll_s,
                                          query=_properties_query, read=_read_partition)
            self.discovery_seconds = time.perf_counter() - t
        return self.node_of

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        """One round: fedflat's cohort through ``SecAggPlusWorkflow`` (client states are
        empty: local rules with client state are refused under SecAgg+).

        Raises:
            FlowerRunError: a cohort of one client, a cohort too large for the mask
                modulus, or a protocol run that halted or failed.
        """
        round_, jobs = payload.round, list(jobs)
        if not jobs:  # an empty Poisson cohort: the model stays put, as in the serial run
            return Mapped([])
        if len(jobs) < 2:
            raise FlowerRunError(f"round {round_} sampled only client {jobs[0].client_id}: "
                                 "SecAgg+ needs at least 2 clients per round")
        T = self.fc.secagg_quantization_range
        if len(jobs) * T >= SECAGG_MODULUS_RANGE:
            raise FlowerRunError(f"round {round_}: {len(jobs)} clients x quantization_range "
                                 f"{T} overflow the 2^32 mask modulus")
        node_of = self.connect()
        instructions = [
            (GridClientProxy(node_of[j.client_id], self.grid, self.run_id),
             encode_fit(payload, j, self.scenario_yaml, self.sha, weighting=self.weighting,
                        max_weight_=self.max_weight,
                        clipping_range=self.fc.secagg_clipping_range))
            for j in jobs]
        self.strategy.pending = _Pending(round_, jobs, instructions, payload.params.numel())
        self.strategy.aggregated = None
        self.grid.errors.clear()
        state = self.legacy.state
        state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = round_ + 1
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([payload.params.numpy()]), True)
        self.workflow(self.grid, self.legacy)  # type: ignore[arg-type]
        aggregated, self.strategy.pending = self.strategy.aggregated, None
        if aggregated is None:
            why = "; ".join(self.grid.errors) or "see Flower's log (run with --verbose)"
            raise FlowerRunError(f"SecAgg+ round {round_} halted before aggregation: {why}")
        mean, results = aggregated
        return Mapped(list(results), {"secagg_clients": len(jobs)}, secure_mean=mean)


def run_secagg_server(grid: Grid, context: Context, settings: ServerSettings) -> RunResult:
    """The SecAgg+ ServerApp's main: fedflat's Runner and round over a
    :class:`SecAggTransport`.

    Raises:
        ScenarioError: a scenario that cannot run under SecAgg+ (nothing is written).
        FlowerRunError: missing nodes, a halted or failed protocol round.
    """
    def make_transport(sc: Scenario, fed: FederatedData) -> SecAggTransport:
        return SecAggTransport(grid, context, sc, fed.num_clients, settings,
                               max_weight(sc, fed))

    return run_over_transport(settings, lambda loaded: check_secagg(loaded.scenario),
                              make_transport)


def make_secagg_server_app(settings: ServerSettings | None = None) -> ServerApp:
    """A ServerApp running fedflat's server loop with SecAgg+ rounds.

    Args:
        settings: fixed settings (simulate); None = from the run config.
    """
    from fedflat.flower.server_app import settings_from_run_config

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_secagg_server(grid, context, settings or settings_from_run_config(context.run_config))

    return server_app


# Components a `flwr run` app can name for a SecAgg+ deployment
# ([tool.flwr.app.components] serverapp = "fedflat.flower.secagg:server_app", clientapp =
# "fedflat.flower.secagg:client_app"); the server reads the scenario from the run config.
server_app = make_secagg_server_app()
client_app = make_secagg_client_app()
