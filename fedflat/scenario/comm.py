"""The ``comm:`` block of a scenario: which codec each direction of the channel uses.

Example::

    comm:
      uplink: {codec: top_k, ratio: 0.01, error_feedback: true, index_encoding: packed}
      downlink: {codec: fp16}

Byte counts (wire format) are documented in :mod:`fedflat.comm.codecs`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CodecName = Literal["fp32", "fp16", "bf16", "qsgd", "top_k", "random_k", "sign"]


class CodecConfig(BaseModel):
    """One direction of the channel (an ``uplink:`` or ``downlink:`` block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: CodecName = Field(
        "fp32",
        description=(
            "Codec: fp32 (uncompressed, 4 B/coordinate), fp16 / bf16 (2 B/coordinate), "
            "qsgd (stochastic quantisation, ceil(log2(2*levels+1)) bits/coordinate + a "
            "4 B norm per bucket_size coordinates), top_k / random_k (k float32 values + "
            "indices), sign (1 bit/coordinate + a 4 B scale). Every message also carries a "
            "4 B header."
        ),
    )
    levels: int | None = Field(
        None,
        ge=1,
        description="qsgd only, required: quantisation levels s per sign (count, >=1).",
    )
    bucket_size: int | None = Field(
        512,
        ge=0,
        description=(
            "qsgd only: coordinates per bucket, each bucket quantised with its own 4 B "
            "float32 norm (count; 512 as in the reference implementations). 0 or null: "
            "one norm for the whole vector (variance bound sqrt(d)/levels instead of "
            "min(B/levels^2, sqrt(B)/levels))."
        ),
    )
    ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "top_k / random_k: fraction of coordinates kept, in (0, 1]; "
            "k = max(1, ceil(ratio * d)). Give ratio or k, not both."
        ),
    )
    k: int | None = Field(
        None,
        ge=1,
        description="top_k / random_k: coordinates kept (count, capped at d).",
    )
    index_encoding: Literal["int32", "packed", "seed"] = Field(
        "int32",
        description=(
            "top_k / random_k: how indices travel: int32 (4 B each), packed "
            "(ceil(log2 d) bits each) or seed (random_k only: one 8 B seed, the "
            "receiver regenerates the indices)."
        ),
    )
    unbiased: bool = Field(
        True,
        description=(
            "random_k only: scale kept values by d/k on decode so the message is an "
            "unbiased estimate (false: send kept values unscaled)."
        ),
    )
    error_feedback: bool = Field(
        False,
        description=(
            "Keep what compression dropped (a per-sender residual vector, "
            "4 B/coordinate of sender memory) and add it to the next message."
        ),
    )

    @model_validator(mode="after")
    def _check_params(self) -> CodecConfig:
        sparse = self.codec in ("top_k", "random_k")
        if self.codec == "qsgd" and self.levels is None:
            raise ValueError("levels is required for codec qsgd (an integer >= 1)")
        if self.codec != "qsgd" and self.levels is not None:
            raise ValueError(f"levels applies to codec qsgd only, not {self.codec}")
        default_bucket = type(self).model_fields["bucket_size"].default
        if self.codec != "qsgd" and self.bucket_size != default_bucket:
            raise ValueError(f"bucket_size applies to codec qsgd only, not {self.codec}")
        if sparse and (self.k is None) == (self.ratio is None):
            raise ValueError(
                f"codec {self.codec} needs exactly one of k or ratio, "
                f"got k={self.k}, ratio={self.ratio}"
            )
        if not sparse:
            # Judged by value, not by "was it written": a resolved scenario spells out
            # every default, and must load again.
            defaults = type(self).model_fields
            for name in ("k", "ratio", "index_encoding"):
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"{name} applies to top_k / random_k only, not {self.codec}"
                    )
        default_unbiased = type(self).model_fields["unbiased"].default
        if self.codec != "random_k" and self.unbiased != default_unbiased:
            raise ValueError(
                f"unbiased applies to codec random_k only, not {self.codec}"
            )
        if self.codec == "top_k" and self.index_encoding == "seed":
            raise ValueError(
                "index_encoding 'seed' applies to random_k only "
                "(top_k indices depend on the values)"
            )
        return self


class CommConfig(BaseModel):
    """The ``comm:`` block: codecs for the uplink (client -> server) and downlink."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uplink: CodecConfig = Field(
        default_factory=CodecConfig,
        description=(
            "Codec for client updates (the flat delta y_i - x); with error_feedback "
            "the residual is per-client state."
        ),
    )
    downlink: CodecConfig = Field(
        default_factory=CodecConfig,
        description=(
            "Codec for the server broadcast (encoded once per round, every participant "
            "receives the same bytes); with error_feedback the residual is server "
            "state."
        ),
    )
