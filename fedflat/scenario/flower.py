"""Scenario schema of the Flower backend (``flower``): secure aggregation settings.

Example::

    flower:
      secagg: true
      secagg_num_shares: 1.0            # every sampled client shares keys with every other
      secagg_reconstruction_threshold: 0.5
      secagg_clipping_range: 8.0
      secagg_quantization_range: 4194304

The values go to Flower's ``SecAggPlusWorkflow`` (Bell et al., CCS 2020, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead"); which fedflat rules can run
under it is listed in :mod:`fedflat.flower.secagg`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Flower's SecAgg+ draws its masks from [0, 2^32): the sum of a round's quantised vectors
# must stay below it (checked per round by the SecAgg+ backend).
SECAGG_MODULUS_RANGE = 2**32


class FlowerConfig(BaseModel):
    """``flower``: settings that only the Flower backend (``fedflat flower ...``) reads."""

    model_config = ConfigDict(extra="forbid")

    secagg: bool = Field(
        False,
        description=(
            "Run each round through Flower's SecAgg+ (legacy SecAggPlusWorkflow + "
            "secaggplus_mod): the server learns only the weighted mean of the cohort's "
            "deltas. Only server.aggregation.rule 'mean' (any server optimizer) can run; "
            "robust rules, attacks other than label_flip, user-level DP, per-client uplink "
            "extras (SCAFFOLD, FedDyn, FedSMOO, MoFedSAM), lossy uplink codecs and "
            "asynchronous rounds are refused (see fedflat.flower.secagg)."
        ),
    )
    secagg_num_shares: int | float = Field(
        1.0,
        gt=0,
        description=(
            "SecAgg+ shares of each client's secret keys: an int > 2 is a count, a float "
            "a fraction of the round's cohort (1.0 = every sampled client is a neighbour "
            "of every other, i.e. plain SecAgg)."
        ),
    )
    secagg_reconstruction_threshold: int | float = Field(
        0.5,
        gt=0,
        description=(
            "Shares needed to reconstruct a dropped client's key: an int count (< "
            "num_shares) or a float fraction in (0, 1] of num_shares (at least 2). Higher "
            "is more private, lower tolerates more dropouts."
        ),
    )
    secagg_clipping_range: float = Field(
        8.0,
        gt=0,
        description=(
            "c: each coordinate of a client's weighted delta (n_i / max n) * Δ_i is "
            "clipped to [-c, c] before quantisation; the fraction clipped is logged as "
            "client/secagg_clipped_fraction. The quantisation step is 2c / "
            "quantization_range."
        ),
    )
    secagg_quantization_range: int = Field(
        2**22,
        gt=1,
        lt=SECAGG_MODULUS_RANGE,
        description=(
            "T: integer levels of the stochastic quantiser (Flower's default 2^22); a "
            "round's cohort size times T must stay below 2^32."
        ),
    )

    @model_validator(mode="after")
    def _shares_and_threshold(self) -> FlowerConfig:
        n, t = self.secagg_num_shares, self.secagg_reconstruction_threshold
        if isinstance(n, float) and n > 1:
            raise ValueError(f"secagg_num_shares as a fraction must be <= 1, got {n}")
        if isinstance(n, int) and n != 1 and n <= 2:
            raise ValueError(f"secagg_num_shares as a count must be > 2, got {n}")
        if isinstance(t, float) and t > 1:
            raise ValueError(f"secagg_reconstruction_threshold as a fraction must be <= 1, got {t}")
        if isinstance(n, int) and isinstance(t, int) and n > 1 and t >= n:
            raise ValueError(f"secagg_reconstruction_threshold = {t} must be less than "
                             f"secagg_num_shares = {n}")
        return self
