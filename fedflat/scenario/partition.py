"""The ``data.partition`` block: one config class per partitioner, chosen by ``method``.

Each class's fields are the scenario-settable keyword arguments of its partitioner in
:mod:`fedflat.data.partition` (``PARTITIONERS``; tests/test_registry.py checks the two
agree), so a key of another partitioner (``alpha`` under ``natural``) is an error naming
it. ``natural`` takes no keys: the dataset's own clients.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from fedflat.scenario.variants import VariantConfig, family, family_of


class PartitionConfig(VariantConfig):
    """Base of the per-partitioner configs (ALGORITHMS.md §6).

    ``PartitionConfig(**block)`` returns the variant named by ``block["method"]``
    (default ``natural``).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    method: str


_ALPHA = "Dirichlet concentration α (> 0)"


class NaturalPartition(PartitionConfig):
    method: Literal["natural"] = Field(
        "natural", description="The dataset's own clients (synthetic devices, FEMNIST "
        "writers, Shakespeare roles).")


class IidPartition(PartitionConfig):
    method: Literal["iid"] = Field("iid", description="Uniformly random equal split.")


class DirichletPerClassPartition(PartitionConfig):
    method: Literal["dirichlet_per_class"] = Field(
        "dirichlet_per_class", description="Dir(α·1_N) per class across clients "
        "(NIID-Bench, ALGORITHMS.md §6.1).")
    alpha: float = Field(0.5, gt=0, description=_ALPHA + " per client.")
    min_size: int = Field(
        10, ge=0, description="Resample until every client has this many samples.")


class DirichletPerClientPartition(PartitionConfig):
    method: Literal["dirichlet_per_client"] = Field(
        "dirichlet_per_client", description="A class prior per client (Hsu et al. / "
        "FL-Simulator, §6.2).")
    alpha: float = Field(0.5, gt=0, description=_ALPHA + ", read as alpha_scale says.")
    alpha_scale: Literal["total_mass", "per_coordinate"] = Field(
        "total_mass", description="'total_mass' = Dir(α·p), per-class concentration α/C "
        "(Hsu et al., the FedSAM splits); 'per_coordinate' = Dir(α·1_C) (FL-Simulator, "
        "FedDyn).")
    size_sigma: float = Field(
        0.0, ge=0, description="Log-normal σ of the client quotas (0 = equal quotas n/N).")
    allow_reuse: bool = Field(
        False, description="Reset exhausted class pools (duplicates samples, as "
        "FL-Simulator).")


class ShardsPartition(PartitionConfig):
    method: Literal["shards"] = Field("shards", description="McMahan's label-sorted shards.")
    shards_per_client: int = Field(2, ge=1, description="Shards per client.")


class QuantitySkewPartition(PartitionConfig):
    method: Literal["quantity_skew"] = Field(
        "quantity_skew", description="Log-normal client sizes with iid labels (§6.4).")
    sigma: float = Field(
        1.0, ge=0, description="Log-normal σ of the client sizes (0 = balanced).")
    min_size: int = Field(1, ge=0, description="Redraw until every client has this many.")


PartitionSpec = family(
    PartitionConfig, label="partitioner", tag="method", default="natural",
    variants=(NaturalPartition, IidPartition, DirichletPerClassPartition,
              DirichletPerClientPartition, ShardsPartition, QuantitySkewPartition),
)
PARTITION_CONFIGS: dict[str, type[PartitionConfig]] = family_of(PartitionConfig).variants  # type: ignore[assignment]
LABEL_PARTITIONS: tuple[str, ...] = tuple(n for n in PARTITION_CONFIGS if n != "natural")

