"""The client side of a run: a model, resident data, and the client update of many clients.

A ``ClientWorker`` lives in the driver (serial backend), in a Ray actor, or in a Flower
ClientApp. It builds its model and local rule once and trains any number of clients per
call; it never imports Ray or Flower.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedflat.attacks.byzantine import flip_labels
from fedflat.client.oracle_base import UpdateContext
from fedflat.client.update import ClientResult, client_update
from fedflat.client.uplink import BYTES_KEY, STATE_PREFIX, UplinkContext, state_key
from fedflat.comm.codecs import fp32_nbytes
from fedflat.data.datasets import OnDemandClients
from fedflat.metrics.fairness import local_metrics
from fedflat.rng import stream
from fedflat.runtime.build import (
    FederatedData,
    build_flat_model,
    build_local_rule,
    build_uplink,
    byzantine_clients,
)
from fedflat.runtime.shared_data import IndexedClients
from fedflat.scenario.schema import Scenario

EF_KEY = state_key("codec", "residual")  # client state key of the uplink error-feedback residual
BN_KEY = "bn_buffers"  # client state key of a client's own BatchNorm statistics (local mode)


@dataclass(frozen=True)
class ClientJob:
    """One client's work in one round (plain data, cheap to ship)."""

    round: int
    client_id: int
    lr: float
    max_steps: int | None = None
    version: int | None = None  # asynchronous mode: the model version the client starts from
    weight: float | None = None  # aggregation weight instead of n_i (staleness weight)


@dataclass
class RoundPayload:
    """What the server broadcasts to every client of a round (put in the object store once)."""

    round: int
    params: Tensor
    broadcast: dict[str, Tensor]
    versions: dict[int, Tensor] = field(default_factory=dict)  # asynchronous mode only
    # The global BatchNorm running statistics (model.bn_aggregation: average); empty when the
    # model has none or the clients keep their own.
    buffers: Tensor = field(default_factory=lambda: torch.zeros(0))
    buffer_versions: dict[int, Tensor] = field(default_factory=dict)  # asynchronous mode only


class ClientWorker:
    """Trains clients of one run; keeps the model and the data resident."""

    def __init__(self, scenario: Scenario, fed: FederatedData, device: str = "cpu",
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.sc = scenario
        self.device = torch.device(device)
        ds = fed.dataset
        self.x = ds.x_train.to(self.device)
        self.y = ds.y_train.to(self.device)
        # A client's examples are gathered (on-demand devices: generated) when it is sampled,
        # the recent ones cached: gathering every client's up front copied the training set
        # once more per process and grew start-up with the population.
        self.client_data: Sequence[tuple[Tensor, Tensor]] = (
            OnDemandClients(fed.source, self.device) if fed.source is not None else
            IndexedClients(self.x, self.y, fed.client_indices))
        self.model = build_flat_model(scenario, ds, self.device)
        self.model.module.train()
        # A client's BatchNorm statistics before its first round (local mode): the module's
        # initial running_mean 0 / running_var 1, as on the server.
        self.init_buffers = self.model.get_buffers()
        self.bn_local = self.model.num_buffers > 0 and scenario.model.bn_aggregation == "local"
        self.rule = build_local_rule(scenario)
        self.uplink = build_uplink(scenario, fed.num_clients, self.model.segments)
        # Label-flipping Byzantine clients train honestly on flipped labels (§5.2).
        self.flipped = byzantine_clients(scenario, fed.num_clients) \
            if scenario.attack.kind == "label_flip" else frozenset()
        self.num_classes = ds.num_classes
        # eval.per_client: each client's own test split, for its local model after the update.
        self.own_test: list[tuple[Tensor, Tensor]] | None = None
        if scenario.eval.per_client and fed.client_test is not None:
            self.own_test = [(x.to(self.device), y.to(self.device))
                             for x, y in fed.client_test.tensors(ds)]
        # runtime.backend vmap / runtime.vectorize: a chunk's clients trained at once, with
        # the same batches, noise and results (imported here: only the vectorised paths need it).
        self.chunks = None
        if scenario.runtime.backend == "vmap" or scenario.runtime.vectorize:
            from fedflat.runtime.vmap_backend import ChunkRunner
            self.chunks = ChunkRunner(self)

    def run(self, payload: RoundPayload, jobs: Sequence[ClientJob],
            states: Sequence[dict[str, Tensor]]) -> list[ClientResult]:
        """Run ``jobs`` in order from the payload's global model; results in job order."""
        if self.chunks is not None:
            return self.chunks.run(payload, jobs, states)
        versions = {v: t.to(self.device) for v, t in payload.versions.items()}
        latest = payload.params.to(self.device)
        broadcast = {k: v.to(self.device) for k, v in payload.broadcast.items()}
        global_buffers = payload.buffers.to(self.device)
        buffer_versions = {v: t.to(self.device) for v, t in payload.buffer_versions.items()}
        if not self.bn_local and global_buffers.numel() != self.model.num_buffers:
            raise ValueError(f"the payload carries {global_buffers.numel()} BatchNorm statistics, "
                             f"the model has {self.model.num_buffers}")
        out = []
        for job, state in zip(jobs, states, strict=True):
            x, y = self.client_data[job.client_id]
            params = latest if job.version is None else versions[job.version]
            start_buffers = global_buffers if job.version is None or not global_buffers.numel() \
                else buffer_versions[job.version]
            ctx = UpdateContext(
                model=self.model, x_global=params, round=job.round, client_id=job.client_id,
                num_samples=len(y), broadcast=broadcast,
                client_state={k: v.to(self.device) for k, v in state.items()},
            )
            # Every client starts from the global statistics (or its own, local mode), never
            # from whatever the previous client on this worker left in the module.
            if self.bn_local:
                own = state.get(BN_KEY)
                self.model.set_buffers(own.to(self.device) if own is not None
                                       else self.init_buffers)
            elif start_buffers.numel():
                self.model.set_buffers(start_buffers)
            gen = stream(self.sc.seed, "client", job.round, job.client_id, device=self.device)
            if job.client_id in self.flipped:
                y = flip_labels(y, self.num_classes)
            res = client_update(self.rule, ctx, x, y, job.lr, gen,
                                max_steps=job.max_steps)
            self.local_eval(res, params)
            self._uplink(res, job, state)
            if self.bn_local:
                res.client_state[BN_KEY] = self.model.get_buffers()
            elif global_buffers.numel():
                # The statistics go up uncompressed (fp32, one header) next to the delta.
                res.buffers = self.model.get_buffers()
                res.metrics["bytes_up"] += float(fp32_nbytes(res.buffers))
            if self.device.type != "cpu":
                res.delta = res.delta.cpu()
                res.buffers = res.buffers.cpu()
                res.client_state = {k: v.cpu() for k, v in res.client_state.items()}
                res.extras = {k: v.cpu() for k, v in res.extras.items()}
            out.append(res)
        return out

    def local_eval(self, res: ClientResult, start: Tensor) -> None:
        """eval.per_client: the client's own model (start + delta, before the uplink codec)
        on its own test split, into the client's metrics."""
        if self.own_test is not None:
            res.metrics.update(local_metrics(self.model, start + res.delta,
                                             self.own_test[res.client_id]))

    def _uplink(self, res: ClientResult, job: ClientJob, state: dict[str, Tensor]) -> None:
        """Send the delta through the uplink chain ([clip -> noise] -> codec): the server
        sees what the chain returns; the chain's state (error-feedback residual) stays with
        the client, in its persistent state."""
        ctx = UplinkContext(self.sc.seed, job.round, job.client_id, self.device)
        res.delta, chain_state, metrics = self.uplink.update(res.delta, state, ctx)
        res.client_state = {k: v for k, v in res.client_state.items()
                            if not k.startswith(STATE_PREFIX)} | chain_state
        extra_bytes = sum(fp32_nbytes(v) for v in res.extras.values())
        res.metrics.update(metrics)
        res.metrics[BYTES_KEY] = float(metrics[BYTES_KEY] + extra_bytes)
