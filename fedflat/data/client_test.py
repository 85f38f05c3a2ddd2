"""Each client's own test split: one definition for personalization and per-client evaluation.

``eval.client_test`` chooses it for the whole run (``client_test_split``), so the global
model's per-client accuracy (``eval.per_client``) and the personalized accuracy
(``personalization:``) are always measured on the same examples:

* ``dataset_share``: under a natural partition of a dataset with per-client test data
  (synthetic devices, FEMNIST writers, Shakespeare roles) that data; otherwise a disjoint
  share of the pooled test set that mirrors the client's training labels
  (``label_mirroring_share``). The training data is untouched.
* ``local_holdout``: ⌈f·n_i⌉ of client i's own samples (f = ``eval.holdout_fraction``),
  removed from its training data (``local_holdout``) — also under a natural partition.
* ``auto`` (the default, the choices fedflat made before the key existed):
  ``local_holdout`` in a personalized run without per-client test data in the dataset,
  else ``dataset_share``.

Randomness: the label share shuffles class c of the test set with
``numpy_rng(seed, "eval", 3, c)``; the holdout of client i draws from
``numpy_rng(seed, "split", 1, i)`` (the streams used before, so results are unchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from fedflat.data.datasets import Dataset
from fedflat.rng import numpy_rng

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario

Mode = Literal["dataset_share", "local_holdout"]


@dataclass(frozen=True)
class ClientTestSplits:
    """Every client's test split: indices into the dataset's test arrays (``source``
    "test") or into its training arrays (``source`` "train": a holdout no client trains on)."""

    mode: Mode
    source: Literal["test", "train"]
    indices: list[np.ndarray]

    def tensors(self, ds: Dataset) -> list[tuple[Tensor, Tensor]]:
        """The splits as (x, y) tensors, gathered once."""
        x, y = (ds.x_test, ds.y_test) if self.source == "test" else (ds.x_train, ds.y_train)
        return [(x[torch.as_tensor(ix)], y[torch.as_tensor(ix)]) for ix in self.indices]

    def describe(self) -> dict[str, object]:
        """For clients.json: the resolved mode, where the examples come from, their counts."""
        return {"mode": self.mode, "source": self.source,
                "test_samples": [len(ix) for ix in self.indices]}


def resolve_mode(choice: str, *, personalized: bool, own_test_data: bool) -> Mode:
    """``eval.client_test`` with ``auto`` resolved (see the module docstring)."""
    if choice == "auto":
        return "local_holdout" if personalized and not own_test_data else "dataset_share"
    if choice not in ("dataset_share", "local_holdout"):
        raise ValueError(f"eval.client_test must be auto, dataset_share or local_holdout, "
                         f"got {choice!r}")
    return choice  # type: ignore[return-value]


def label_mirroring_share(y_train: np.ndarray, y_test: np.ndarray,
                          client_indices: Sequence[np.ndarray], num_classes: int,
                          seed: int) -> list[np.ndarray]:
    """Each client's share of the pooled test set, as sorted indices into it.

    Each class's test samples are shuffled with a fixed seed and dealt out in consecutive
    blocks whose sizes are proportional to the clients' training counts of that class
    (largest remainder, so the blocks cover the class and are disjoint).
    """
    n = len(client_indices)
    counts = np.zeros((n, num_classes), dtype=np.int64)
    for i, ix in enumerate(client_indices):
        counts[i] = np.bincount(y_train[np.asarray(ix, dtype=np.int64)], minlength=num_classes)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(num_classes):
        pool = np.flatnonzero(y_test == c)
        total = counts[:, c].sum()
        if total == 0 or pool.size == 0:
            continue
        pool = pool[numpy_rng(seed, "eval", 3, c).permutation(pool.size)]
        quota = pool.size * counts[:, c] / total
        take = np.floor(quota).astype(np.int64)
        rest = pool.size - take.sum()
        take[np.argsort(-(quota - take), kind="stable")[:rest]] += 1
        bounds = np.concatenate([[0], np.cumsum(take)])
        for i in np.flatnonzero(take):
            parts[i].append(pool[bounds[i]:bounds[i + 1]])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def local_holdout(client_indices: Sequence[np.ndarray], fraction: float,
                  seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out ⌈fraction · n_i⌉ of each client's samples (at least 1, leaving at least 1)
    as its own test split, uniformly at random from ``numpy_rng(seed, "split", 1, i)``.

    Returns:
        (train indices, test indices) per client, each sorted.

    Raises:
        ValueError: a client with fewer than 2 samples.
    """
    train, test = [], []
    for i, ix in enumerate(client_indices):
        ix = np.asarray(ix, dtype=np.int64)
        n = len(ix)
        if n < 2:
            raise ValueError(f"client {i} has {n} sample(s); local_holdout needs >= 2 per "
                             "client (or use eval.client_test: dataset_share)")
        k = min(n - 1, max(1, int(np.ceil(fraction * n))))
        perm = numpy_rng(seed, "split", 1, i).permutation(n)
        test.append(np.sort(ix[perm[:k]]))
        train.append(np.sort(ix[perm[k:]]))
    return train, test


def client_test_split(sc: Scenario, ds: Dataset, client_indices: Sequence[np.ndarray]
                      ) -> tuple[list[np.ndarray], ClientTestSplits]:
    """The clients' training indices (with a local holdout removed) and their test splits,
    as ``eval.client_test`` says. Every consumer of a client's test split uses this.

    Raises:
        ValueError: local_holdout with a client of fewer than 2 samples.
    """
    n = len(client_indices)
    own = (sc.data.partition.method == "natural" and ds.test_groups is not None
           and len(ds.test_groups) >= n)
    mode = resolve_mode(sc.eval.client_test, own_test_data=own,
                        personalized=sc.personalization.method != "none")
    if mode == "local_holdout":
        train, test = local_holdout(client_indices, sc.eval.holdout_fraction, sc.seed)
        return train, ClientTestSplits(mode, "train", test)
    if own:
        assert ds.test_groups is not None  # noqa: S101 - checked in ``own``
        test = [np.asarray(g, dtype=np.int64) for g in ds.test_groups[:n]]
    else:
        test = label_mirroring_share(ds.y_train.numpy(), ds.y_test.numpy(), client_indices,
                                     ds.num_classes, sc.seed)
    return list(client_indices), ClientTestSplits(mode, "test", test)
