"""Datasets and partitioners: pooled arrays plus client index arrays.

``load_dataset`` gives a :class:`Dataset` (pooled tensors, optional natural client
groups); the partitioners in :mod:`fedflat.data.partition` split its training labels
into clients.
"""

from __future__ import annotations

from fedflat.data.datasets import (
    DATASETS,
    Dataset,
    cache_dir,
    load_dataset,
    resolve_data_dir,
)
from fedflat.data.partition import (
    PARTITIONERS,
    client_stats,
    dirichlet_per_class,
    dirichlet_per_client,
    iid,
    make_partition,
    natural,
    quantity_sizes,
    quantity_skew,
    shards,
)
from fedflat.data.synthetic import (
    SyntheticData,
    SyntheticParams,
    generate_synthetic,
    synthetic_sizes,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "SyntheticData",
    "SyntheticParams",
    "cache_dir",
    "client_stats",
    "dirichlet_per_class",
    "dirichlet_per_client",
    "generate_synthetic",
    "iid",
    "load_dataset",
    "make_partition",
    "natural",
    "quantity_sizes",
    "quantity_skew",
    "resolve_data_dir",
    "shards",
    "synthetic_sizes",
]
