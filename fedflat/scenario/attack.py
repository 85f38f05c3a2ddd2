"""Scenario schema of Byzantine clients (``attack``), ALGORITHMS.md §5.2.

A YAML block reads::

    attack:
      kind: alie
      fraction: 0.2        # or ids: [3, 17, 21]
      z_rule: epfml
      optimize: true       # alie/ipm: the factor of largest damage on a grid, per round

The Byzantine clients are fixed for the whole run (drawn once from the population).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AttackKind = Literal[
    "none", "sign_flip", "label_flip", "scaling", "alie", "ipm", "mimic", "inf", "gaussian"
]

# The documented grids of the optimised attacks (``optimize: true``); the round's
# default factor (ALIE's z from z_rule, IPM's epsilon) is always tried as well.
ALIE_Z_GRID: tuple[float, ...] = (
    0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0
)
IPM_EPSILON_GRID: tuple[float, ...] = (
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0
)

_KEY = "attack"


class AttackConfig(BaseModel):
    """``attack``: which clients are Byzantine and what they send."""

    model_config = ConfigDict(extra="forbid")

    kind: AttackKind = Field(
        default="none",
        description=(
            "none | sign_flip (send -delta) | label_flip (train on labels C-1-y) | "
            "scaling (send scale*delta) | alie (mu - z*sigma of the honest deltas, "
            "Baruch et al. 2019) | ipm (-epsilon * honest mean, Xie et al. 2019) | mimic "
            "(copy the honest client that the epfml heuristic picks, Karimireddy et al. "
            "2022) | inf (every coordinate inf_value) | gaussian (N(gauss_mu, "
            "gauss_sigma^2) per coordinate). alie, ipm and mimic are omniscient: they "
            "see the honest deltas of the round."
        ),
    )
    fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Fraction of the client population that is Byzantine: floor(fraction * "
            "num_clients) clients drawn once per run from the 'attack' random stream. "
            "Exclusive with ids."
        ),
    )
    ids: list[int] | None = Field(
        default=None,
        description=(
            "Explicit Byzantine client ids (0-based), fixed for the run. Exclusive "
            "with fraction."
        ),
    )
    scale: float = Field(
        default=10.0,
        description="scaling: factor the Byzantine clients multiply their delta by.",
    )
    z_rule: Literal["epfml", "paper", "fixed"] = Field(
        default="epfml",
        description=(
            "alie: how z is chosen from n (inputs of the round) and f (Byzantine "
            "inputs of the round), s = floor(n/2 + 1) - f: 'epfml' z = "
            "Phi^-1((n-f-s)/(n-f)) (the reference code), 'paper' z = Phi^-1((n-s)/n), "
            "'fixed' uses z."
        ),
    )
    z: float = Field(
        default=1.5,
        description=(
            "alie with z_rule 'fixed': number of standard deviations (the authors' "
            "code default is 1.5)."
        ),
    )
    epsilon: float = Field(
        default=0.1,
        gt=0.0,
        description=(
            "ipm: Byzantine clients send -epsilon times the honest mean (0.1 in the "
            "reference code; large values, e.g. 100, target median-type rules)."
        ),
    )

    optimize: bool = Field(
        default=False,
        description=(
            "alie, ipm: each round, choose the factor (z, epsilon) that maximises the "
            "L2 distance between the aggregate and the honest mean, simulating the "
            "server's rule, pre-aggregators and weighting on the round's deltas; "
            "candidates are factor_grid plus the default factor (z_rule's z, epsilon)."
        ),
    )
    factor_grid: list[float] | None = Field(
        default=None,
        min_length=1,
        description=(
            "optimize: the factors tried (>= 0). null = the documented grid: alie z in "
            "0, 0.25, ..., 10 (ALIE_Z_GRID), ipm epsilon in 0.05, 0.1, ..., 100 "
            "(IPM_EPSILON_GRID, fedflat/scenario/attack.py)."
        ),
    )
    mimic_warmup: int = Field(
        default=20,
        ge=1,
        description=(
            "mimic: rounds during which the heuristic direction z (running top "
            "principal direction of the honest deltas) is learned and the target is "
            "re-chosen each round (argmax_i <x_i, z>); afterwards the target client is "
            "fixed (epfml MimicVariantAttacker; 20 is fedflat's choice)."
        ),
    )
    inf_value: float = Field(
        default=float("inf"),
        description=(
            "inf: the value sent in every coordinate. inf (default): the server drops "
            "the rows as non-finite; a huge finite value (e.g. 1e30) reaches the rule."
        ),
    )
    gauss_mu: float = Field(
        default=0.0, description="gaussian: mean of every coordinate sent (delta units)."
    )
    gauss_sigma: float = Field(
        default=1.0,
        ge=0.0,
        description=(
            "gaussian: standard deviation of every coordinate sent (delta units); drawn "
            "independently per Byzantine client and round from the 'attack' stream."
        ),
    )

    @model_validator(mode="after")
    def _who(self) -> AttackConfig:
        if self.ids is not None:
            if self.fraction > 0:
                raise ValueError("give either fraction or ids, not both")
            if any(i < 0 for i in self.ids) or len(set(self.ids)) != len(self.ids):
                raise ValueError(
                    f"ids must be distinct non-negative client ids, got {self.ids}"
                )
        if self.optimize and self.kind not in ("alie", "ipm"):
            raise ValueError(
                f"optimize applies to kind alie or ipm, got kind {self.kind!r}"
            )
        if self.factor_grid is not None and any(
            not v >= 0 or v == float("inf") for v in self.factor_grid
        ):
            raise ValueError(
                f"factor_grid must hold finite factors >= 0, got {self.factor_grid}"
            )
        if self.kind != "none" and self.fraction == 0 and not self.ids:
            raise ValueError(
                f"kind is {self.kind!r} but no client is Byzantine: set fraction > 0 "
                "or ids"
            )
        return self


def check_attack(cfg: AttackConfig, num_clients: int) -> str | None:
    """Check the attack block against the population size.

    Args:
        cfg: the attack block.
        num_clients: population size N.

    Returns:
        An error message naming the key, or None.
    """
    if cfg.kind == "none":
        return None
    if cfg.ids is not None:
        bad = [i for i in cfg.ids if i >= num_clients]
        if bad:
            return (
                f"{_KEY}.ids: client ids {bad} do not exist (the population has "
                f"{num_clients} clients, ids 0..{num_clients - 1})"
            )
        return None
    if int(cfg.fraction * num_clients + 1e-9) == 0:
        return (
            f"{_KEY}.fraction: {cfg.fraction} of {num_clients} clients is no client; "
            f"use at least {1 / num_clients:.4g}"
        )
    return None
