"""The chunk runner of workers: the vectorised backend (``runtime.backend: vmap``).

``runtime.backend: vmap`` is the serial backend whose worker trains the round's clients at
once with ``fedflat.client.vectorized.ChunkEngine`` (through ``ChunkRunner``); a Ray client
actor does the same with its chunk when ``runtime.vectorize`` is on. This module only moves
data: it draws each client's batches (``batch_indices``) and DP noise from the client's own
stream, in the order the serial loop draws them, pads them into one step, and sends the
deltas through the worker's uplink chain (DP-FedSAM's clip and noise, then the codec) as the
serial worker does, one client at a time from each client's own streams. The round and the
server side are ``round_loop.run_round`` and ``ServerCore``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from fedflat.attacks.byzantine import flip_labels
from fedflat.client.update import ClientResult, batch_indices
from fedflat.client.vectorized import ChunkEngine, StepBatch, VecDP, VecRule
from fedflat.privacy.mechanisms import layer_clip_norms
from fedflat.rng import stream
from fedflat.runtime.build import build_schedule
from fedflat.scenario.schema import Scenario

if TYPE_CHECKING:
    from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload

def vec_rule(sc: Scenario, segments: Sequence | None = None) -> VecRule:
    """The scenario's local rule as the vectorised engine's hyperparameters."""
    c = sc.client
    o, corr = c.oracle, c.correction
    dp = sc.privacy.sample_level
    vdp = None
    if dp.enabled:
        if dp.noise_multiplier is None:
            raise ValueError("sample-level DP needs a resolved noise multiplier (resolve_privacy)")
        clips = None
        if dp.per_layer_clipping:
            assert segments is not None  # noqa: S101 - the worker passes its model's
            clips = tuple(layer_clip_norms(segments, dp.clip_norm, "equal"))
        vdp = VecDP(mechanism=dp.mechanism, clip_norm=dp.clip_norm,
                    noise_multiplier=dp.noise_multiplier,
                    rho=dp.factory_kwargs().get("rho", 0.0), layer_clips=clips)
    return VecRule(
        oracle=o.name, oracle_params=o.factory_kwargs(),
        prox_mu=corr.prox_mu, scaffold=corr.scaffold, feddyn_alpha=corr.feddyn_alpha,
        mofedsam_alpha=corr.mofedsam_alpha, optimizer=c.optimizer, momentum=c.momentum,
        weight_decay=c.weight_decay, nesterov=c.nesterov, grad_clip=c.grad_clip, dp=vdp)


class ChunkRunner:
    """A worker's chunks through the vectorised engine (what ``ClientWorker.run`` calls)."""

    def __init__(self, worker: ClientWorker) -> None:
        self.worker = worker
        self.sc = worker.sc
        self.schedule = build_schedule(worker.sc)
        self.engine = ChunkEngine(vec_rule(worker.sc, worker.model.segments), worker.model)

    def run(self, payload: RoundPayload, jobs: Sequence[ClientJob],
            states: Sequence[dict[str, Tensor]]) -> list[ClientResult]:
        """The results of ``jobs`` in job order, equal to the serial loop's."""
        wk = self.worker
        dev = wk.device
        if not jobs:
            return []
        latest = payload.params.to(dev)
        versions = {v: t.to(dev) for v, t in payload.versions.items()}
        start = torch.stack([latest if j.version is None else versions[j.version] for j in jobs])
        broadcast = {k: v.to(dev) for k, v in payload.broadcast.items()}
        dev_states = [{k: v.to(dev) for k, v in s.items()} for s in states]
        data = []
        for j in jobs:
            x, y = wk.client_data[j.client_id]
            if j.client_id in wk.flipped:
                y = flip_labels(y, wk.num_classes)
            data.append((x, y))
        sizes = [len(y) for _, y in data]
        lr = torch.tensor([j.lr for j in jobs], dtype=start.dtype, device=dev)
        expected = None
        dp = self.sc.privacy.sample_level
        if dp.enabled:
            expected = torch.tensor(
                [dp.sampling_rate * n if dp.sampling_rate is not None
                 else (min(self.schedule.batch_size, n) if n > 0 else self.schedule.batch_size)
                 for n in sizes], dtype=start.dtype, device=dev)
        gens = [stream(self.sc.seed, "client", j.round, j.client_id, device=dev) for j in jobs]
        results = self.engine.train(
            start, lr, [j.client_id for j in jobs], sizes,
            self._steps(jobs, data, gens, start.shape[1]), broadcast, dev_states, expected)
        for i, (res, job, state) in enumerate(zip(results, jobs, states, strict=True)):
            wk.local_eval(res, start[i])
            wk._uplink(res, job, state)
            if dev.type != "cpu":
                res.delta = res.delta.cpu()
                res.client_state = {k: v.cpu() for k, v in res.client_state.items()}
                res.extras = {k: v.cpu() for k, v in res.extras.items()}
        return results

    def _steps(self, jobs: Sequence[ClientJob], data: list[tuple[Tensor, Tensor]],
               gens: list[torch.Generator], d: int) -> Iterator[StepBatch]:
        """The chunk's local steps. Each client's generator is consumed in the serial order
        (the batch of step k, then that step's noise draws), so batches and noise do not
        depend on the engine."""
        sch = self.schedule
        dp = self.engine.rule.dp
        draws = dp.releases if dp is not None and dp.noise_multiplier > 0 else 0
        totals = []
        for j, (_, y) in zip(jobs, data, strict=True):
            t = sch.num_steps(len(y))
            totals.append(t if j.max_steps is None else min(t, j.max_steps))
        iters = [batch_indices(len(y), sch, g, j.max_steps)
                 for j, (_, y), g in zip(jobs, data, gens, strict=True)]
        x0, y0 = data[0]
        empty = torch.zeros(0, dtype=torch.long, device=y0.device)
        for k in range(max(totals)):
            active = [k < t for t in totals]
            idxs, noise = [], []
            for c, on in enumerate(active):
                idx = next(iters[c]) if on else empty
                idxs.append(idx)
                if draws:
                    g = gens[c]
                    noise.append(torch.stack([
                        torch.randn(d, generator=g, device=g.device, dtype=torch.float32)
                        for _ in range(draws)]) if on else torch.zeros(draws, d, device=g.device))
            lens = torch.tensor([len(i) for i in idxs], device=y0.device)
            width = max(1, int(lens.max()))
            xs = [x[i] for (x, _), i in zip(data, idxs, strict=True)]
            ys = [y[i] for (_, y), i in zip(data, idxs, strict=True)]
            xs[0] = _pad(xs[0], width)  # pad_sequence pads to the widest; this sets >= 1
            ys[0] = _pad(ys[0], width)
            xb = pad_sequence(xs, batch_first=True)
            yb = pad_sequence(ys, batch_first=True)
            mask = (torch.arange(width, device=lens.device) < lens.unsqueeze(1)).to(x0.dtype)
            yield StepBatch(xb, yb, mask, torch.tensor(active, device=y0.device),
                            torch.stack(noise) if draws else None)


def _pad(t: Tensor, width: int) -> Tensor:
    if len(t) >= width:
        return t
    return torch.cat([t, t.new_zeros((width - len(t), *t.shape[1:]))])
