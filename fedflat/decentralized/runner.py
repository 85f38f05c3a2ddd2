"""Decentralized runs: the run driver with a gossip "backend" instead of a server.

``GossipRunner`` is the ordinary ``Runner`` (files, metrics.jsonl, checkpoints, resume,
privacy accounting per node) whose rounds are planned for every node and executed by
``GossipBackend``: each node runs ``client_update`` (the same local rule as a federated
client) from its own model, then the nodes gossip (``fedflat.decentralized.gossip``).

Randomness: node i's batches and oracle noise in round t come from
``stream(seed, "client", t, i)``, exactly like federated client i, which is what makes
D-SGD on the complete graph equal FedAvg with every client; Erdős–Rényi graphs are drawn
from ``numpy_rng(seed, "topology", 0)``, random matchings from
``numpy_rng(seed, "topology", 1, t, s)`` (round t, gossip step s) and CHOCO's stochastic
codecs from ``stream(seed, "codec", t, i, s)``. A node's local optimizer state (momentum)
restarts every round, as a federated client's does.

Metrics per round (besides the driver's): ``consensus_distance`` = (1/n) Σ‖x_i − x̄‖² after
the gossip; ``test_accuracy`` / ``test_loss`` (and train_* with ``eval.split``) of the
averaged model x̄; ``node_test_accuracy_mean`` / ``node_test_accuracy_min`` over the nodes'
own models; ``bytes_up`` (every byte the nodes sent in the round: Σ over gossip steps and
directed edges; there is no downlink, so ``bytes_down`` is 0 and ``bytes_up_total`` is the
whole traffic, comparable with a federated run's up + down), ``bytes_per_edge`` (the bytes
of one message on one directed edge in one gossip step, averaged over the round's
messages); ``spectral_gap``
of W (static graphs). The final model (final_model.pt) is x̄; final_node_models.pt holds
every node's model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.client.oracle_base import UpdateContext
from fedflat.client.update import client_update
from fedflat.comm.codecs import codec_from_config
from fedflat.decentralized import topology as topo
from fedflat.decentralized.gossip import (
    choco_step,
    consensus_distance,
    gossip_step,
    plain_message_nbytes,
)
from fedflat.rng import numpy_rng, stream
from fedflat.runtime.build import FederatedData, build_flat_model, build_local_rule, client_lr
from fedflat.runtime.driver import RoundPlan, Runner, RunResult
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.worker import ClientJob
from fedflat.scenario.loader import LoadedScenario
from fedflat.scenario.schema import Scenario


def resolved_scenario(sc: Scenario) -> Scenario:
    """The scenario as a gossip run executes it, so that the local rule, the privacy
    accountant's calibration and the saved copy agree: ``topology.local_steps`` folded into
    ``client.local_steps``, and ``server.clients_per_round`` = every node (each node trains
    every round: a DP-SGD node is calibrated for one participation per round)."""
    update: dict[str, Any] = {}
    k = sc.topology.local_steps
    if k is not None and sc.client.local_steps != k:
        update["client"] = sc.client.model_copy(update={"local_steps": k})
    n = sc.data.num_clients
    if sc.server.clients_per_round != n:
        update["server"] = sc.server.model_copy(update={"clients_per_round": n})
    return sc.model_copy(update=update) if update else sc


class Mixing:
    """The mixing matrix of every (round, gossip step): fixed, or a fresh random matching."""

    def __init__(self, sc: Scenario, n: int) -> None:
        tp = sc.topology
        self.sc, self.n, self.kind, self.mixing = sc, n, tp.kind, tp.mixing
        self.static: tuple[np.ndarray, np.ndarray] | None = None
        if tp.kind != "random_matching":
            a = topo.graph(tp.kind, n, p=tp.p, rows=tp.rows,
                           rng=numpy_rng(sc.seed, "topology", 0))
            self.static = (a, topo.mixing_matrix(a, tp.mixing))
            self.gap = topo.spectral_gap(self.static[1])

    def at(self, round_: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(adjacency, W) of gossip step ``step`` of round ``round_``."""
        if self.static is not None:
            return self.static
        a = topo.random_matching(self.n, numpy_rng(self.sc.seed, "topology", 1, round_, step))
        return a, topo.mixing_matrix(a, self.mixing)


class GossipBackend:
    """Every node's model, CHOCO's public copies and the nodes' client states; one round =
    local updates of the planned nodes, then gossip. Moves no data anywhere but here."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: Tensor) -> None:
        if sc.runtime.threads is not None:
            torch.set_num_threads(sc.runtime.threads)
        self.sc = sc
        self.n = fed.num_clients
        ds = fed.dataset
        self.client_data = [(ds.x_train[torch.as_tensor(ix)], ds.y_train[torch.as_tensor(ix)])
                            for ix in fed.client_indices]
        self.model = build_flat_model(sc, ds)
        self.model.module.train()
        self.rule = build_local_rule(sc)
        self.mixing = Mixing(sc, self.n)
        tp = sc.topology
        self.codec = codec_from_config(tp.compression) if tp.compression is not None else None
        self.x = params.unsqueeze(0).repeat(self.n, 1)  # every node starts from the same init
        self.x_hat = torch.zeros_like(self.x) if self.codec is not None else None
        self.client_states: dict[int, dict[str, Tensor]] = {}
        # Evaluation (and sharpness) of one model at a time with the server's evaluator:
        # the topology checks leave it a plain mean pipeline that is never applied.
        self.evaluator = ServerCore(sc, fed, params)

    # ------------------------------------------------------------------ rounds
    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        rec: dict[str, Any] = {"round": round_, "clients": [j.client_id for j in jobs]}
        half = self.x.clone()
        losses: list[tuple[float, int]] = []
        metrics: dict[str, list[float]] = {}
        steps = []
        for job in jobs:
            i = job.client_id
            xi, yi = self.client_data[i]
            ctx = UpdateContext(model=self.model, x_global=self.x[i], round=round_, client_id=i,
                                num_samples=len(yi),
                                client_state=self.client_states.get(i, {}))
            gen = stream(self.sc.seed, "client", round_, i)
            res = client_update(self.rule, ctx, xi, yi, job.lr, gen, max_steps=job.max_steps)
            half[i] = self.x[i] + res.delta
            self.client_states[i] = res.client_state
            steps.append(res.steps)
            if not math.isnan(res.train_loss):
                losses.append((res.train_loss, res.num_samples))
            for k, v in res.metrics.items():
                metrics.setdefault(k, []).append(v)
        total = sum(m for _, m in losses)
        rec["client_train_loss"] = sum(v * m for v, m in losses) / total if total else float("nan")
        rec["local_steps_mean"] = sum(steps) / max(len(steps), 1)
        for k, vals in sorted(metrics.items()):
            rec[f"client/{k}"] = sum(vals) / len(vals)
        self.x, sent, edges = self._gossip(round_, half)
        rec["consensus_distance"] = consensus_distance(self.x)
        rec["bytes_up"] = sent  # the driver accumulates bytes_up_total
        rec["bytes_per_edge"] = sent / max(edges, 1)
        if self.mixing.static is not None:
            rec["spectral_gap"] = self.mixing.gap
        rec.update(self._evaluate(round_))
        return rec

    def _gossip(self, round_: int, x: Tensor) -> tuple[Tensor, int, int]:
        """The round's gossip steps: (new models, bytes sent, directed edges used)."""
        tp = self.sc.topology
        sent = edges = 0
        for s in range(tp.gossip_steps):
            a, w = self.mixing.at(round_, s)
            wt = torch.from_numpy(w)
            deg = a.sum(axis=1)
            if self.codec is None:
                nbytes = plain_message_nbytes(x)
                x = gossip_step(x, wt)
            else:
                assert self.x_hat is not None  # noqa: S101 - set with the codec
                gens = [stream(self.sc.seed, "codec", round_, i, s) for i in range(self.n)]
                out = choco_step(x, self.x_hat, wt, self.codec, tp.gamma, gens)
                x, self.x_hat, nbytes = out.x, out.x_hat, out.message_nbytes
            sent += int(sum(int(d) * b for d, b in zip(deg, nbytes, strict=True)))
            edges += int(deg.sum())
        return x, sent, edges

    def _evaluate(self, round_: int) -> dict[str, float]:
        ev = self.sc.eval
        last = round_ + 1 == self.sc.server.rounds
        if not ((round_ + 1) % ev.every == 0 or last):
            return {}
        core = self.evaluator
        core.eval_params = self.x.mean(dim=0)
        out = core.evaluate()
        node: dict[str, list[float]] = {}
        for i in range(self.n):
            core.eval_params = self.x[i]
            for k, v in core.evaluate().items():
                if k.endswith("_accuracy"):
                    node.setdefault(k, []).append(v)
        for k, vals in node.items():
            out[f"node_{k}_mean"] = sum(vals) / len(vals)
            out[f"node_{k}_min"] = min(vals)
        sh = ev.sharpness
        if (sh.lambda_max or sh.trace or sh.m_sharpness) and ((round_ + 1) % sh.every == 0
                                                               or last):
            core.eval_params = self.x.mean(dim=0)
            out.update(core.sharpness(round_))
        core.eval_params = None
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"node_params": self.x, "x_hat": self.x_hat, "client_states": self.client_states}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"node_params", "x_hat", "client_states"} - set(state)
        if missing:
            raise ValueError(f"gossip checkpoint lacks {sorted(missing)}")
        if tuple(state["node_params"].shape) != tuple(self.x.shape):
            raise ValueError(f"checkpoint holds node models of shape "
                             f"{tuple(state['node_params'].shape)}, the run has "
                             f"{tuple(self.x.shape)}")
        self.x = state["node_params"]
        self.x_hat = state["x_hat"]
        self.client_states = state["client_states"]

    def final_params(self) -> Tensor:
        return self.x.mean(dim=0)

    def final_buffers(self) -> Tensor:
        return torch.zeros(0)

    def node_params(self) -> Tensor:
        return self.x

    def describe(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class GossipRunner(Runner):
    """The run driver for a ``topology:`` scenario: every node every round, no server."""

    def __init__(self, loaded: LoadedScenario, run_dir: Path, fed: FederatedData) -> None:
        loaded = dataclasses.replace(loaded, scenario=resolved_scenario(loaded.scenario))
        super().__init__(loaded, run_dir, fed)
        self._backend: GossipBackend | None = None

    def execute(self, backend_state: dict[str, Any] | None = None,
                make_backend: Callable[..., Any] | None = None) -> RunResult:
        def make(sc: Scenario, fed: FederatedData, params: Tensor) -> GossipBackend:
            self._backend = GossipBackend(sc, fed, params)
            return self._backend

        result = super().execute(backend_state, make_backend or make)
        if self._backend is not None and result.summary.get("status") in (
                "completed", "budget_exhausted"):
            torch.save(self._backend.node_params(), self.run_dir / "final_node_models.pt")
        return result

    def _plan(self, timeline: Any, sched: Any, job_times: Any, t: int,
              async_state: Any) -> RoundPlan:
        """Every node trains in round t, except those whose DP budget would run out
        (they still gossip: sharing a DP model is post-processing)."""
        lr = client_lr(self.sc, t)
        jobs = [ClientJob(round=t, client_id=i, lr=lr) for i in range(self.fed.num_clients)]
        exhausted = [j.client_id for j in jobs
                     if not self.plan.client_allowed(j.client_id, *timeline.dp_step(j))]
        jobs = [j for j in jobs if j.client_id not in exhausted]
        info: dict[str, Any] = {}
        if self.rsc.privacy.sample_level.enabled:
            info["budget_exhausted"] = exhausted
        return RoundPlan(t, jobs, None, info, participants=self.fed.num_clients)
