"""Client data that scales with the population: compact index lists, lazy per-client
gathers, and a form of the federated data that Ray shares instead of copying.

At 10⁴-10⁵ clients of a real data set, what used to grow with the population was per-client
overhead rather than the data: a list of N small index arrays (each its own buffer to pickle
and unpickle in every actor), and every worker gathering a copy of every client's examples
when it starts (a second copy of the training set per process). Here the index lists are one
flat array plus offsets, a worker gathers a client's examples when that client is sampled
(a few recent ones cached), and the arrays go to Ray as numpy, which every actor on a node
reads from the shared object store without a copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.data.datasets import Dataset
from fedflat.runtime.build import FederatedData


class IndexLists(Sequence[np.ndarray]):
    """N index arrays stored as one flat int64 array and N + 1 offsets (CSR): client k's
    indices are ``flat[offsets[k]:offsets[k + 1]]`` (a read-only view)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = np.asarray(flat, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 \
                or self.offsets[-1] != len(self.flat) or np.any(np.diff(self.offsets) < 0):
            raise ValueError("IndexLists: offsets must rise from 0 to len(flat)")

    @classmethod
    def from_lists(cls, lists: Sequence[np.ndarray]) -> IndexLists:
        if isinstance(lists, IndexLists):
            return lists
        sizes = np.fromiter((len(ix) for ix in lists), dtype=np.int64, count=len(lists))
        flat = np.concatenate(lists).astype(np.int64, copy=False) if len(lists) \
            else np.zeros(0, dtype=np.int64)
        return cls(flat, np.concatenate(([0], np.cumsum(sizes))))

    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k):  # type: ignore[override]
        if not isinstance(k, (int, np.integer)):
            raise TypeError("IndexLists is indexed by one client id")
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"client {k} out of range 0..{n - 1}")
        view = self.flat[self.offsets[k]:self.offsets[k + 1]]
        view.flags.writeable = False  # a view into every client's indices
        return view

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[k] for k in range(len(self)))


class IndexedClients(Sequence[tuple[Tensor, Tensor]]):
    """Client k's training ``(x[ix_k], y[ix_k])``, gathered when asked for; the ``cache``
    most recent ones are kept (a chunk asks for its clients more than once, and a small
    population stays resident as before)."""

    def __init__(self, x: Tensor, y: Tensor, indices: Sequence[np.ndarray],
                 cache: int = 256) -> None:
        self.x, self.y, self.indices = x, y, indices
        self._get = lru_cache(maxsize=cache)(self._make)

    def _make(self, k: int) -> tuple[Tensor, Tensor]:
        ix = torch.as_tensor(np.asarray(self.indices[k]), device=self.x.device)
        return self.x[ix], self.y[ix]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):  # type: ignore[override]
        if not isinstance(k, (int, np.integer)):
            raise TypeError("IndexedClients is indexed by one client id")
        if k < 0:
            k += len(self)
        return self._get(int(k))


@dataclass(frozen=True)
class SharedData:
    """The federated data in the form Ray stores once per node: numpy arrays (read in each
    actor as zero-copy views of the object store) and the index lists as CSR."""

    meta: dict[str, Any]  # the Dataset's non-array fields
    arrays: dict[str, np.ndarray]  # x_train, y_train, x_test, y_test
    train: tuple[np.ndarray, np.ndarray] | None  # client indices (flat, offsets)
    test_groups: tuple[np.ndarray, np.ndarray] | None
    train_groups: tuple[np.ndarray, np.ndarray] | None
    rest: dict[str, Any]  # FederatedData's other fields as they are (on-demand devices, ...)


_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _csr(lists: Sequence[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    if lists is None:
        return None
    il = IndexLists.from_lists(lists)
    return il.flat, il.offsets


def share(fed: FederatedData) -> SharedData:
    """``fed`` as numpy arrays and CSR index lists (what ``ray.put`` should store)."""
    ds = fed.dataset
    return SharedData(
        meta={"name": ds.name, "num_classes": ds.num_classes, "in_shape": ds.in_shape},
        arrays={k: getattr(ds, k).numpy() for k in _ARRAYS},
        train=_csr(fed.client_indices),
        test_groups=_csr(ds.test_groups), train_groups=_csr(ds.train_groups),
        rest={f.name: getattr(fed, f.name) for f in fields(fed)
              if f.name not in ("dataset", "client_indices")})


def _tensor(a: np.ndarray) -> Tensor:
    with warnings.catch_warnings():
        # Ray hands out read-only views of the shared store; nothing writes into the pooled
        # data (clients train on gathered copies), so a copy per actor would only cost memory.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def unshare(data: SharedData | FederatedData) -> FederatedData:
    """The FederatedData back from :func:`share` (a FederatedData passes through)."""
    if isinstance(data, FederatedData):
        return data

    def lists(csr: tuple[np.ndarray, np.ndarray] | None) -> IndexLists | None:
        return IndexLists(*csr) if csr is not None else None

    t = {k: _tensor(a) for k, a in data.arrays.items()}
    ds = Dataset(name=data.meta["name"], x_train=t["x_train"], y_train=t["y_train"],
                 x_test=t["x_test"], y_test=t["y_test"], num_classes=data.meta["num_classes"],
                 in_shape=tuple(data.meta["in_shape"]),
                 train_groups=lists(data.train_groups),  # type: ignore[arg-type]
                 test_groups=lists(data.test_groups))  # type: ignore[arg-type]
    indices = lists(data.train)
    return FederatedData(ds, indices if indices is not None and len(indices) else [],
                         **data.rest)


#: Above this many clients clients.json holds a summary and the per-client class counts go to
#: a binary file: a JSON list of 5·10⁴ class histograms was 11.6 MB and took 3-20 s to write.
CLIENT_STATS_JSON_MAX = 10_000
CLASS_COUNTS_FILE = "client_class_counts.npy"


def class_counts(indices: Sequence[np.ndarray], labels: np.ndarray,
                 num_classes: int) -> np.ndarray:
    """``[N, C]`` int64: client i's number of training samples of each class (one bincount,
    no per-client loop)."""
    il = IndexLists.from_lists(indices)
    owner = np.repeat(np.arange(len(il)), il.sizes())
    flat = owner * num_classes + np.asarray(labels, dtype=np.int64)[il.flat]
    return np.bincount(flat, minlength=len(il) * num_classes).reshape(len(il), num_classes)


def client_stats_or_file(run_dir: Any, indices: Sequence[np.ndarray], labels: np.ndarray,
                         num_classes: int) -> list[dict[str, Any]] | dict[str, Any]:
    """clients.json's ``clients``: one record per client (``client_stats``) up to
    ``CLIENT_STATS_JSON_MAX`` clients; above, the ``[N, C]`` class counts written to
    ``run_dir/client_class_counts.npy`` and a summary of sizes and classes per client."""
    from pathlib import Path

    from fedflat.data.partition import client_stats

    if len(indices) <= CLIENT_STATS_JSON_MAX:
        return client_stats(indices, labels, num_classes)
    counts = class_counts(indices, labels, num_classes)
    np.save(Path(run_dir) / CLASS_COUNTS_FILE, counts.astype(np.int32))
    sizes, present = counts.sum(axis=1), (counts > 0).sum(axis=1)

    def summary(a: np.ndarray) -> dict[str, float]:
        return {"min": int(a.min()), "mean": float(a.mean()), "max": int(a.max())}

    return {"class_counts_file": CLASS_COUNTS_FILE, "num_samples": summary(sizes),
            "num_classes_present": summary(present)}
