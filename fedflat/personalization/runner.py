"""Personalized runs: the serial driver plus personal models and per-client evaluation.

Each client's test split is ``eval.client_test`` (:mod:`fedflat.data.client_test`, built with
the federated data, a local holdout already removed from the training data); the global model
is trained exactly like a plain run. ``PersonalBackend`` is
the serial backend with two additions: after a client's ordinary update it runs the
client's personal update (ditto / apfl; the personal model and α live in the client's
persistent state, so checkpoints and resume carry them), and at every evaluation it
evaluates, on every client's own test split, the global model and the personal models.

Randomness: personal steps of client i in round t draw batches from
``stream(seed, "client", t, i, 1)``; fine-tuning at evaluation from
``stream(seed, "eval", 4, t, i)``.

Metrics when evaluated (pooled = Σ correct / Σ n over all clients' test splits, mean =
unweighted over the clients with test data): ``client_test_accuracy`` / ``_mean`` (the
global model), ``personal_test_accuracy`` / ``_mean`` (the personal models), ``personal_gain``
(pooled personal − pooled global, as a fraction), ``personal_test_samples`` and, for
apfl, ``apfl_alpha_mean``. ``test_accuracy`` stays the global model on the pooled test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.client.update import ClientResult
from fedflat.personalization.methods import (
    apfl_model,
    apfl_update,
    ditto_update,
    sgd_steps,
)
from fedflat.rng import stream
from fedflat.runtime.backends import SerialBackend
from fedflat.runtime.build import FederatedData, build_flat_model, client_lr
from fedflat.runtime.driver import Runner, RunResult
from fedflat.runtime.round_loop import ClientState, Mapped, WorkerTransport
from fedflat.runtime.worker import ClientJob, ClientWorker, RoundPayload
from fedflat.scenario.schema import Scenario

V_KEY, ALPHA_KEY = "personal_v", "apfl_alpha"  # client-state keys


class PersonalTransport(WorkerTransport):
    """The in-process transport whose clients also take their personal steps (ditto,
    apfl) after the global update; what the server receives is unchanged."""

    def __init__(self, worker: ClientWorker,
                 personal_update: Callable[[ClientJob, ClientResult, ClientState, Tensor], None]
                 ) -> None:
        super().__init__(worker)
        self.personal_update = personal_update

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        results = list(self.worker.run(payload, jobs, states))
        for job, res, state in zip(jobs, results, states, strict=True):
            self.personal_update(job, res, state, payload.params)
        return Mapped(results)


class PersonalBackend(SerialBackend):
    """The serial backend with personal updates and per-client evaluation."""

    def __init__(self, sc: Scenario, fed: FederatedData, params: Tensor) -> None:
        super().__init__(sc, fed, params)
        self.sc = sc
        ds = fed.dataset
        if fed.client_test is None:
            raise ValueError("personalization needs the clients' test splits (fed.client_test)")
        self.client_test = fed.client_test.tensors(ds)
        self.client_data = self.worker.client_data
        self.pz = sc.personalization
        self.model = build_flat_model(sc, ds)  # personal training and evaluation
        self.model.module.train()
        if self.pz.method in ("ditto", "apfl"):  # personal steps ride with the client update
            self.transport = PersonalTransport(self.worker, self._personal_update)

    def round(self, round_: int, jobs: Sequence[ClientJob],
              keep_versions: Sequence[int] | None = None) -> dict[str, Any]:
        rec = super().round(round_, jobs, keep_versions)  # the one round loop
        ev = self.sc.eval
        if (round_ + 1) % ev.every == 0 or round_ + 1 == self.sc.server.rounds:
            rec.update(self.evaluate_personal(round_))
        return rec

    def _personal_update(self, job: ClientJob, res: ClientResult, state: dict[str, Tensor],
                         w_received: Tensor) -> None:
        """The client's personal steps this round (ditto / apfl), into its new state."""
        i = job.client_id
        x, y = self.client_data[i]
        steps = self.pz.personal_steps or max(res.steps, 1)
        gen = stream(self.sc.seed, "client", job.round, i, 1)
        v = state.get(V_KEY, w_received)
        common = {"lr": job.lr, "steps": steps, "batch_size": self.sc.client.batch_size,
                  "gen": gen}
        if self.pz.method == "ditto":
            res.client_state[V_KEY] = ditto_update(self.model, v, w_received, x, y,
                                                   lam=self.pz.ditto_lambda, **common)
            return
        alpha = float(state[ALPHA_KEY]) if ALPHA_KEY in state else self.pz.apfl_alpha
        alpha_lr = self.pz.apfl_alpha_lr if self.pz.apfl_alpha_lr is not None else job.lr
        v, alpha = apfl_update(self.model, v, alpha, w_received, x, y, alpha_lr=alpha_lr,
                               **common)
        res.client_state[V_KEY] = v
        res.client_state[ALPHA_KEY] = torch.tensor(alpha, dtype=torch.float64)

    def personal_model(self, i: int, w: Tensor, round_: int) -> Tensor:
        """Client i's personal model given the current global model ``w``."""
        state = self.core.client_states.get(i, {})
        if self.pz.method == "finetune":
            x, y = self.client_data[i]
            return sgd_steps(self.model, w, x, y, lr=client_lr(self.sc, round_),
                             steps=self.pz.finetune_steps,
                             batch_size=self.sc.client.batch_size,
                             gen=stream(self.sc.seed, "eval", 4, round_, i))
        if V_KEY not in state:  # never took part: the global model
            return w
        if self.pz.method == "apfl":
            return apfl_model(state[V_KEY], float(state[ALPHA_KEY]), w)
        return state[V_KEY]

    def evaluate_personal(self, round_: int) -> dict[str, float]:
        w = self.core.eval_params if self.core.eval_params is not None else self.core.params
        tot = {"global": [0.0, 0], "personal": [0.0, 0]}
        per: dict[str, list[float]] = {"global": [], "personal": []}
        for i, (x, y) in enumerate(self.client_test):
            for name, p in (("global", w), ("personal", self.personal_model(i, w, round_))):
                _, correct, n = self.model.evaluate(p, x, y)
                tot[name][0] += correct
                tot[name][1] += n
                if n:  # a client without test data has no accuracy (dataset_share can give 0)
                    per[name].append(correct / n)
        out = {
            "client_test_accuracy": tot["global"][0] / max(tot["global"][1], 1),
            "client_test_accuracy_mean": _mean(per["global"]),
            "personal_test_accuracy": tot["personal"][0] / max(tot["personal"][1], 1),
            "personal_test_accuracy_mean": _mean(per["personal"]),
        }
        out["personal_gain"] = out["personal_test_accuracy"] - out["client_test_accuracy"]
        out["personal_test_samples"] = float(tot["global"][1])
        if self.pz.method == "apfl":
            alphas = [float(s[ALPHA_KEY]) for s in self.core.client_states.values()
                      if ALPHA_KEY in s]
            if alphas:
                out["apfl_alpha_mean"] = float(np.mean(alphas))
        return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


class PersonalRunner(Runner):
    """The run driver for a ``personalization:`` scenario (serial backend)."""

    def execute(self, backend_state: dict[str, Any] | None = None,
                make_backend: Callable[..., Any] | None = None) -> RunResult:
        return super().execute(backend_state, make_backend or PersonalBackend)
