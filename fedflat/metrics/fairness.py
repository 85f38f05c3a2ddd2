"""Per-client evaluation and fairness summaries (issue 12).

Each client is evaluated on its own test split as ``eval.client_test`` defines it
(:mod:`fedflat.data.client_test`, the same splits personalization evaluates on), built once
with the federated data. Pure numpy/torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from fedflat.data.client_test import ClientTestSplits
from fedflat.data.datasets import Dataset
from fedflat.models.flat import FlatModel
from fedflat.rng import numpy_rng
from fedflat.scenario.schema import Scenario

PREFIX = "per_client/"  # metrics.jsonl keys of the summaries
TAIL = 0.1  # worst / best 10 %


def gini(values: Sequence[float] | np.ndarray) -> float:
    """Gini coefficient Σ_i Σ_j |x_i − x_j| / (2 n² mean) of non-negative values.

    0 when all values are equal (also when all are 0), (n − 1)/n for one 1 among zeros.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan")
    mean = x.mean()
    if mean == 0:
        return 0.0
    # Sorted form of the double sum: Σ_i (2i − n − 1) x_(i) = ½ Σ_i Σ_j |x_i − x_j|.
    s = np.sort(x)
    i = np.arange(1, x.size + 1)
    return float(np.sum((2 * i - x.size - 1) * s) / (x.size**2 * mean))


def tail_mean(values: Sequence[float] | np.ndarray, frac: float = TAIL,
              worst: bool = True) -> float:
    """Mean of the lowest (``worst``) or highest ⌈frac·n⌉ values (at least one)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size == 0:
        return float("nan")
    k = max(1, math.ceil(frac * x.size - 1e-9))
    return float(x[:k].mean() if worst else x[-k:].mean())


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """metrics.jsonl summaries of one evaluation's per-client rows (clients with n = 0
    have no accuracy and are left out). std is the population standard deviation."""
    rows = [r for r in rows if r["n"] > 0]
    out: dict[str, float] = {}
    if not rows:
        return out
    acc = np.array([r["accuracy"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    out[PREFIX + "accuracy_mean"] = float(acc.mean())
    out[PREFIX + "accuracy_std"] = float(acc.std())
    out[PREFIX + "accuracy_worst10"] = tail_mean(acc, worst=True)
    out[PREFIX + "accuracy_best10"] = tail_mean(acc, worst=False)
    out[PREFIX + "accuracy_gini"] = gini(acc)
    out[PREFIX + "loss_mean"] = float(loss.mean())
    local = np.array([r["local_accuracy"] for r in rows if r.get("local_accuracy") is not None])
    if local.size:
        out[PREFIX + "local_accuracy_mean"] = float(local.mean())
        out[PREFIX + "local_accuracy_worst10"] = tail_mean(local, worst=True)
        out[PREFIX + "local_clients"] = float(local.size)
    return out


def sample_clients(num_clients: int, k: int | None, seed: int) -> np.ndarray:
    """The fixed, seeded sample of clients evaluated every time (all clients when k is None
    or at least the population)."""
    if k is None or k >= num_clients:
        return np.arange(num_clients)
    return np.sort(numpy_rng(seed, "eval", 2).choice(num_clients, k, replace=False))


def evaluate_on(model: FlatModel, w: Tensor, x: Tensor, y: Tensor,
                buffers: Tensor | None = None) -> tuple[float, float, int]:
    """(accuracy, mean loss, n) of the model at ``w`` (with BatchNorm ``buffers`` if given)
    on one client's split; NaN accuracy and loss for an empty split."""
    if len(y) == 0:
        return float("nan"), float("nan"), 0
    if buffers is not None and buffers.numel():
        model.set_buffers(buffers)
    loss_sum, correct, n = model.evaluate(w, x, y)
    return correct / n, loss_sum / n, n


def local_metrics(model: FlatModel, w_local: Tensor,
                  split: tuple[Tensor, Tensor]) -> dict[str, float]:
    """A client's own locally trained model on its own test split, evaluated on the worker
    right after the update (the model's BatchNorm statistics are the client's own then).
    Empty for an empty split, so that round means are over clients that have test data."""
    acc, loss, n = evaluate_on(model, w_local, *split)
    return {"local_accuracy": acc, "local_loss": loss} if n else {}


class PerClientEvaluator:
    """The server side of ``eval.per_client``: the sampled clients' test splits, and each
    client's local-model accuracy from its last participation (checkpointed state)."""

    def __init__(self, sc: Scenario, ds: Dataset, client_test: ClientTestSplits) -> None:
        self.clients = sample_clients(len(client_test.indices), sc.eval.per_client_sample,
                                      sc.seed)
        splits = client_test.tensors(ds)
        self.splits = {int(c): splits[c] for c in self.clients}
        # client id -> (round, local accuracy, local loss) of its last participation
        self.local: dict[int, tuple[int, float, float]] = {}

    def record(self, round_: int, client_ids: Sequence[int],
               metrics: Sequence[dict[str, float]]) -> None:
        for c, m in zip(client_ids, metrics, strict=True):
            if int(c) in self.splits and "local_accuracy" in m:
                self.local[int(c)] = (round_, float(m["local_accuracy"]), float(m["local_loss"]))

    def evaluate(self, model: FlatModel, w: Tensor, round_: int,
                 buffers_for: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """(per_client.jsonl rows, metrics.jsonl summaries) of the global model ``w``;
        ``buffers_for(client_id)`` gives the BatchNorm statistics to evaluate with."""
        rows = []
        for c, (x, y) in self.splits.items():
            acc, loss, n = evaluate_on(model, w, x, y, buffers_for(c))
            row: dict[str, Any] = {"round": round_, "client_id": c, "n": n,
                                   "accuracy": acc, "loss": loss}
            if c in self.local:
                r, la, ll = self.local[c]
                row.update(local_round=r, local_accuracy=la, local_loss=ll)
            rows.append(row)
        return rows, summarize(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"local": dict(self.local)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.local = dict(state["local"]) if state else {}
