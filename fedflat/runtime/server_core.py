"""The server side of a run: global state, the server pipeline, per-client state, evaluation.

``ServerCore`` owns everything a checkpoint must hold on the server side. The serial
backend keeps one in-process; the Ray backend wraps one in a server actor. It never imports
Ray or Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.client.adversarial import robust_accuracy
from fedflat.client.update import ClientResult
from fedflat.client.zeroth_order import message_nbytes, replay
from fedflat.comm.codecs import codec_from_config, fp32_nbytes, transmit
from fedflat.data.datasets import sample_devices
from fedflat.data.synthetic import SyntheticDevices
from fedflat.metrics.fairness import PerClientEvaluator
from fedflat.metrics.sharpness import hessian_trace, lambda_max, m_sharpness
from fedflat.rng import numpy_rng, stream
from fedflat.runtime.build import (
    FederatedData,
    build_flat_model,
    build_optimizer,
    build_pipeline,
)
from fedflat.runtime.client_store import ClientStore
from fedflat.runtime.worker import BN_KEY, ClientJob, RoundPayload
from fedflat.scenario.schema import Scenario
from fedflat.server.pipeline import ServerRound

# Evaluation sample of on-demand devices when eval.max_samples is unset (pooling every
# device's test split is what made a round's cost grow with the population).
ON_DEMAND_EVAL_SAMPLES = 10_000


class ServerCore:
    """Global model, server-pipeline state, client states; applies one round at a time."""

    def __init__(self, scenario: Scenario, fed: FederatedData, params: Tensor,
                 threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.sc = scenario
        self.num_clients = fed.num_clients
        self.model = build_flat_model(scenario, fed.dataset)
        self.pipeline = build_pipeline(scenario, fed.num_clients)
        self.params = params.clone()
        self.eval_params: Tensor | None = None
        self.pipeline_state = self.pipeline.init(self.params)
        # Only clients with state, as rows of one array per key (cheap to checkpoint).
        self.client_states = ClientStore()
        self.versions: dict[int, Tensor] = {0: self.params}  # asynchronous mode
        self.downlink = codec_from_config(scenario.comm.downlink)
        self.down_residual: Tensor | None = None
        self._pending_down_residual: Tensor | None = None
        self._down_nbytes = 0
        self.broadcast: dict[str, Tensor] = {}
        # BatchNorm running statistics: with bn_aggregation average they are global model
        # state (averaged, broadcast, checkpointed); with local the clients keep their own
        # (in their client state) and the server holds none.
        self.init_buffers = self.model.get_buffers()
        self.bn_local = self.model.num_buffers > 0 and scenario.model.bn_aggregation == "local"
        self.buffers = self.init_buffers.clone() if not self.bn_local else self.init_buffers[:0]
        self.buffer_versions: dict[int, Tensor] = {0: self.buffers}  # asynchronous mode
        self._client_sizes = fed.client_sizes()
        self._eval_sets = self._make_eval_sets(fed)
        self._client_test = self._per_client_test(fed)
        self.per_client = (PerClientEvaluator(scenario, fed.dataset, fed.client_test)
                           if scenario.eval.per_client and fed.client_test is not None
                           else None)

    # ------------------------------------------------------------------ rounds
    def begin_round(self, round_: int, versions: Sequence[int] = ()) -> RoundPayload:
        """The round's payload; a lossy downlink codec sends the decoded model (clients
        compute their deltas from it; the server applies them to its exact model)."""
        gen = stream(self.sc.seed, "codec", round_, self.num_clients)  # id N = the server
        tx = transmit(self.downlink, self.params, self.down_residual, gen)
        # Committed by end_round: a payload prepared ahead (and a checkpoint taken before
        # the round runs) must not advance the residual.
        self._pending_down_residual = tx.residual
        extra = sum(fp32_nbytes(v) for v in self.broadcast.values())
        if self.buffers.numel():  # the statistics go down uncompressed (fp32)
            extra += fp32_nbytes(self.buffers)
        self._down_nbytes = tx.nbytes + extra
        params = self.params if self.sc.comm.downlink.codec == "fp32" else tx.decoded
        old = {v: self.versions[v] for v in versions}
        if self.sc.comm.downlink.codec != "fp32":  # stale versions travel through the codec too
            old = {v: transmit(self.downlink, x, None, stream(self.sc.seed, "codec", round_,
                                                            self.num_clients + 1 + v)).decoded
                   for v, x in old.items()}
        return RoundPayload(round=round_, params=params, broadcast=dict(self.broadcast),
                            versions=old, buffers=self.buffers,
                            buffer_versions={v: self.buffer_versions[v] for v in versions}
                            if self.buffers.numel() else {})

    def states_for(self, client_ids: Sequence[int]) -> list[dict[str, Tensor]]:
        return self.client_states.get_many(client_ids)

    def end_round(self, round_: int, jobs: Sequence[ClientJob],
                  results: Sequence[ClientResult],
                  keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        """Aggregate the round's results (given in job order), evaluate when due.

        In asynchronous mode ``keep_versions`` lists the model versions that clients in
        flight still train from; the new model becomes version ``round_ + 1``.
        """
        rec: dict[str, Any] = {"round": round_, "clients": [j.client_id for j in jobs],
                               "bytes_down_per_client": self._down_nbytes}
        if self._pending_down_residual is not None:
            self.down_residual = self._pending_down_residual
            self._pending_down_residual = None
        if results or self.sc.privacy.user_level.enabled:
            # With user-level DP an empty Poisson cohort still releases noise: the accounted
            # mechanism adds it every round, whoever took part.
            for r in results:
                self.client_states.put(r.client_id, r.client_state)
            if self.per_client is not None:
                self.per_client.record(round_, [r.client_id for r in results],
                                       [r.metrics for r in results])
            zo = self.sc.client.zeroth_order
            if zo.enabled and zo.uplink == "seeds":
                self._replay_seed_messages(jobs, results)
            d = self.params.numel()
            deltas = (torch.stack([r.delta for r in results]) if results
                      else self.params.new_zeros(0, d))
            weights = torch.tensor([
                float(j.weight) if j.weight is not None else float(r.num_samples)
                for j, r in zip(jobs, results, strict=True)
            ])
            extras = {k: torch.stack([r.extras[k] for r in results]) for k in results[0].extras} \
                if results else {}
            rnd = ServerRound(round=round_, params=self.params, deltas=deltas, weights=weights,
                              client_ids=[r.client_id for r in results],
                              num_clients=self.num_clients, extras=extras,
                              broadcast=dict(self.broadcast))
            gen = stream(self.sc.seed, "server", round_)
            rnd, self.pipeline_state, metrics = self.pipeline.apply(rnd, self.pipeline_state, gen)
            assert rnd.new_params is not None  # noqa: S101 - Pipeline.apply guarantees it
            self.params = rnd.new_params
            if self.buffers.numel() and results:
                self.buffers = self._average_buffers(jobs, results)
            self.broadcast = rnd.broadcast
            self.eval_params = rnd.eval_params
            losses = [(r.train_loss, r.num_samples) for r in results
                      if not math.isnan(r.train_loss)]
            total = sum(n for _, n in losses)
            # The cohort's own mini-batch loss during local training (every round); the
            # global model's loss on the pooled train split is global_train_loss (evaluate).
            rec["client_train_loss"] = (sum(loss * n for loss, n in losses) / total if total
                                        else float("nan"))
            rec["update_norm"] = float(rnd.aggregate.norm()) if rnd.aggregate is not None else 0.0
            rec["local_steps_mean"] = sum(r.steps for r in results) / max(len(results), 1)
            rec.update(metrics)
            rec["bytes_up"] = int(sum(r.metrics.get("bytes_up", 0.0) for r in results))
            keys = sorted({k for r in results for k in r.metrics} - {"bytes_up"})
            for k in keys:  # per-client metrics of the oracle (sam_loss_gap, frac_clipped, ...)
                vals = [r.metrics[k] for r in results if k in r.metrics]
                rec[f"client/{k}"] = sum(vals) / len(vals)
        else:
            # An empty Poisson cohort: the model stays put, no client loss.
            rec["client_train_loss"] = float("nan")
        if keep_versions is not None:
            self.versions[round_ + 1] = self.params
            self.versions = {v: x for v, x in self.versions.items()
                             if v in set(keep_versions) | {round_ + 1}}
            self.buffer_versions[round_ + 1] = self.buffers
            self.buffer_versions = {v: x for v, x in self.buffer_versions.items()
                                    if v in self.versions}
        ev = self.sc.eval
        last = round_ + 1 == self.sc.server.rounds
        if (round_ + 1) % ev.every == 0 or last:
            rec.update(self.evaluate())
            if self.per_client is not None:  # rows go to per_client.jsonl (the driver pops them)
                rec["per_client_rows"], summary = self.per_client.evaluate(
                    self.model, self.eval_params if self.eval_params is not None else self.params,
                    round_, self._client_buffers)
                rec.update(summary)
        sh = ev.sharpness
        if (sh.lambda_max or sh.trace or sh.m_sharpness) and ((round_ + 1) % sh.every == 0 or last):
            rec.update(self.sharpness(round_))
        return rec

    def _replay_seed_messages(self, jobs: Sequence[ClientJob],
                              results: Sequence[ClientResult]) -> None:
        """Zeroth-order seed uplink: rebuild every delta from its (seeds, scalars) message
        and count the message's bytes. The replay must equal the client's own delta bit for
        bit; a difference is a bug, never a tolerance."""
        zo, opt = self.sc.client.zeroth_order, build_optimizer(self.sc)
        for job, r in zip(jobs, results, strict=True):
            if "zo_seeds" not in r.message:  # a transport that drops the message (Flower)
                raise RuntimeError("client.zeroth_order.uplink is 'seeds' but client "
                                   f"{r.client_id}'s result carries no seed message; this "
                                   "deployment supports uplink: vector only")
            seeds, scalars = r.message["zo_seeds"], r.message["zo_scalars"]
            delta = replay(self.params, seeds, scalars, job.lr, zo.estimator, opt)
            if not torch.equal(delta, r.delta):
                raise RuntimeError(f"zeroth-order seed replay of client {r.client_id} differs "
                                   "from its delta")
            r.delta = delta
            r.metrics["bytes_up"] = float(message_nbytes(seeds, scalars))

    def _average_buffers(self, jobs: Sequence[ClientJob],
                         results: Sequence[ClientResult]) -> Tensor:
        """The new global statistics: the clients' final statistics averaged with the
        weights of the mean rule (FedSAM's code averages the whole state dict, buffers
        included, with the clients' sample counts). Not the server optimizer, the robust
        rule or DP noise: those act on parameter deltas only."""
        uniform = self.sc.server.aggregation.weighting == "uniform"
        w = torch.tensor([float(j.weight) if j.weight is not None
                          else (1.0 if uniform else float(r.num_samples))
                          for j, r in zip(jobs, results, strict=True)], dtype=torch.float64)
        return _weighted_mean([r.buffers for r in results], w)

    # ------------------------------------------------------------------ evaluation
    def _per_client_test(self, fed: FederatedData) -> list[tuple[Tensor, Tensor]] | None:
        """Each client's own test split (natural partition of a dataset that has one)."""
        ds = fed.dataset
        natural = self.sc.data.partition.method == "natural"
        if not self.bn_local or ds.test_groups is None or not natural:
            return None
        return [(ds.x_test[torch.as_tensor(g)], ds.y_test[torch.as_tensor(g)])
                for g in ds.test_groups[: fed.num_clients]]

    def _client_buffers(self, client_id: int) -> Tensor:
        """The BatchNorm statistics client ``client_id`` evaluates the global model with."""
        if self.bn_local:
            own = self.client_states.get(client_id, {}).get(BN_KEY)
            return own if own is not None else self.init_buffers
        return self.buffers

    def _local_buffers(self) -> dict[int, Tensor]:
        """bn_aggregation local: the statistics of every client that has trained so far."""
        return {c: s[BN_KEY] for c, s in sorted(self.client_states.items()) if BN_KEY in s}

    def eval_buffers(self) -> Tensor:
        """The statistics the server evaluates a single model with: the global ones, or
        (local mode, sharpness) the client-size-weighted mean of the clients' own."""
        if not self.bn_local:
            return self.buffers
        own = self._local_buffers()
        if not own:
            return self.init_buffers
        w = torch.tensor([float(self._client_sizes[c]) for c in own], dtype=torch.float64)
        return _weighted_mean(list(own.values()), w)

    def _make_eval_sets(self, fed: FederatedData) -> dict[str, tuple[Tensor, Tensor]]:
        if fed.source is not None:
            return self._sample_eval_sets(fed.source)
        ds, ev = fed.dataset, self.sc.eval
        sets: dict[str, tuple[Tensor, Tensor]] = {}
        if ev.split in ("test", "both"):
            sets["test"] = (ds.x_test, ds.y_test)
        if ev.split in ("train", "both"):
            ix = torch.as_tensor(np.concatenate(fed.client_indices)) if fed.client_indices else None
            # Keys global_train_loss / _accuracy: the global model on the pooled train split,
            # named apart from the cohort's client_train_loss.
            sets["global_train"] = (ds.x_train[ix], ds.y_train[ix])
        sh = ev.sharpness
        pool = np.concatenate(fed.client_indices)
        keep = numpy_rng(self.sc.seed, "eval", 1).choice(len(pool), min(sh.num_samples, len(pool)),
                                                          replace=False)
        pick = torch.as_tensor(pool[np.sort(keep)])
        self._sharp_set = (ds.x_train[pick], ds.y_train[pick])
        if ev.max_samples is not None:
            for name, (x, y) in list(sets.items()):
                if len(y) > ev.max_samples:
                    keep = numpy_rng(self.sc.seed, "eval", 0).choice(len(y), ev.max_samples,
                                                                     replace=False)
                    keep_t = torch.as_tensor(sorted(keep))
                    sets[name] = (x[keep_t], y[keep_t])
        return sets

    def _sample_eval_sets(self, devices: SyntheticDevices) -> dict[str, tuple[Tensor, Tensor]]:
        """On-demand devices: a fixed-size sample of devices' splits (eval.max_samples, else
        ON_DEMAND_EVAL_SAMPLES), never the pooled population."""
        ev = self.sc.eval
        m = ev.max_samples if ev.max_samples is not None else ON_DEMAND_EVAL_SAMPLES
        # (eval set name, the devices' split it samples, its stream id)
        wanted = [("test", "test", 0)] if ev.split in ("test", "both") else []
        wanted += [("global_train", "train", 1)] if ev.split in ("train", "both") else []
        sets = {name: sample_devices(devices, split, m, numpy_rng(self.sc.seed, "eval", 0, i))
                for name, split, i in wanted}
        self._sharp_set = sample_devices(devices, "train", ev.sharpness.num_samples,
                                         numpy_rng(self.sc.seed, "eval", 1))
        return sets

    def evaluate(self) -> dict[str, float]:
        w = self.eval_params if self.eval_params is not None else self.params
        if self.bn_local:
            return self._evaluate_per_client(w)
        out: dict[str, float] = {}
        if self.buffers.numel():
            self.model.set_buffers(self.buffers)
        for name, (x, y) in self._eval_sets.items():
            loss_sum, correct, n = self.model.evaluate(w, x, y)
            out[f"{name}_loss"] = loss_sum / max(n, 1)
            out[f"{name}_accuracy"] = correct / max(n, 1)
        if self.sc.adversarial.evaluating and "test" in self._eval_sets:
            out["robust_test_accuracy"] = self._robust_accuracy(w)
        return out

    def _robust_accuracy(self, w: Tensor) -> float:
        """PGD accuracy on a fixed test subset; the random starts restart from one stream
        each evaluation, so the figure depends on w only."""
        adv = self.sc.adversarial
        x, y = self._eval_sets["test"]
        if adv.eval_samples is not None and len(y) > adv.eval_samples:
            keep = numpy_rng(self.sc.seed, "eval", 3).choice(len(y), adv.eval_samples,
                                                             replace=False)
            keep_t = torch.as_tensor(sorted(keep))
            x, y = x[keep_t], y[keep_t]
        return robust_accuracy(self.model, w, x, y, adv.eval_attack(),
                               stream(self.sc.seed, "eval", 2))

    def _evaluate_per_client(self, w: Tensor) -> dict[str, float]:
        """bn_aggregation local (FedBN): each client evaluates the global parameters with
        its own statistics. With a per-client test split (natural partition of femnist),
        client i on its own test data, pooled over all clients (test_* = totals over every
        client's test data; clients that have not trained yet use the initial statistics).
        Without one, every client that has trained so far evaluates the whole eval set
        and test_* / global_train_* are the mean over those clients (before any has trained: the
        initial statistics)."""
        out: dict[str, float] = {}
        own = self._local_buffers()
        if self._client_test is not None and "test" in self._eval_sets:
            loss_sum = correct = n = 0.0
            for c, (x, y) in enumerate(self._client_test):
                self.model.set_buffers(own.get(c, self.init_buffers))
                ls, cor, k = self.model.evaluate(w, x, y)
                loss_sum, correct, n = loss_sum + ls, correct + cor, n + k
            out["test_loss"] = loss_sum / max(n, 1)
            out["test_accuracy"] = correct / max(n, 1)
        stats = list(own.values()) or [self.init_buffers]
        for name, (x, y) in self._eval_sets.items():
            if f"{name}_loss" in out:
                continue
            losses, accs = [], []
            for b in stats:
                self.model.set_buffers(b)
                ls, cor, k = self.model.evaluate(w, x, y)
                losses.append(ls / max(k, 1))
                accs.append(cor / max(k, 1))
            out[f"{name}_loss"] = sum(losses) / len(losses)
            out[f"{name}_accuracy"] = sum(accs) / len(accs)
        return out

    def sharpness(self, round_: int) -> dict[str, float]:
        """Sharpness of the evaluated global model on a fixed training subset (§7)."""
        sh = self.sc.eval.sharpness
        w = self.eval_params if self.eval_params is not None else self.params
        if self.model.num_buffers:  # sharpness of the model as evaluated (running statistics)
            self.model.set_buffers(self.eval_buffers())
        x, y = self._sharp_set
        batches = [(x[i : i + sh.batch_size], y[i : i + sh.batch_size])
                   for i in range(0, len(y), sh.batch_size)]
        out: dict[str, float] = {}
        if sh.lambda_max:
            res = lambda_max(self.model, w, batches, gen=stream(self.sc.seed, "eval", 1, round_),
                             max_iter=sh.max_iter, tol=sh.tol)
            out["lambda_max"] = res.value
            out["lambda_max_iterations"] = float(res.iterations)
        if sh.trace:
            tr = hessian_trace(self.model, w, batches, gen=stream(self.sc.seed, "eval", 2, round_),
                               max_iter=sh.max_iter, tol=sh.tol)
            out["hessian_trace"] = tr.mean
            out["hessian_trace_stderr"] = tr.std_error
        if sh.m_sharpness:
            ms = m_sharpness(self.model, w, (x, y), m=sh.m, rho=sh.rho, k=sh.ascent_steps,
                             gen=stream(self.sc.seed, "eval", 3, round_))
            out["m_sharpness"] = float(ms.value)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"params": self.params, "eval_params": self.eval_params,
                "pipeline_state": self.pipeline_state, "client_states": self.client_states,
                "broadcast": self.broadcast, "down_residual": self.down_residual,
                "versions": self.versions, "buffers": self.buffers,
                "buffer_versions": self.buffer_versions,
                "per_client": self.per_client.state_dict() if self.per_client else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        required = {"params", "eval_params", "pipeline_state", "client_states", "broadcast"}
        missing = required - set(state)
        if missing:
            raise ValueError(f"server checkpoint lacks {sorted(missing)}")
        if len(state["pipeline_state"]) != len(self.pipeline.steps):
            raise ValueError("checkpoint was written by a different server pipeline")
        self.params = state["params"]
        self.eval_params = state["eval_params"]
        self.pipeline_state = state["pipeline_state"]
        self.client_states = ClientStore.from_dict(state["client_states"])
        self.broadcast = state["broadcast"]
        self.down_residual = state.get("down_residual")
        self.versions = state.get("versions", {0: self.params})
        # A checkpoint from before BatchNorm statistics were global state has none.
        buffers = state.get("buffers")
        if buffers is not None and buffers.numel() != self.buffers.numel():
            raise ValueError(f"checkpoint holds {buffers.numel()} BatchNorm statistics, the "
                             f"model has {self.buffers.numel()}")
        self.buffers = buffers if buffers is not None else self.buffers
        self.buffer_versions = state.get("buffer_versions",
                                         dict.fromkeys(self.versions, self.buffers))
        if self.per_client is not None:
            self.per_client.load_state_dict(state.get("per_client"))


def _weighted_mean(rows: Sequence[Tensor], w: Tensor) -> Tensor:
    """Σ w_i row_i / Σ w_i, accumulated in float64, in the rows' dtype."""
    stacked = torch.stack(list(rows)).to(torch.float64)
    return ((w / w.sum()) @ stacked).to(rows[0].dtype)
