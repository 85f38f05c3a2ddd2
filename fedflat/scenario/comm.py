"""The ``comm:`` block of a scenario: which codec each direction of the channel uses.

Example::

    comm:
      uplink: {codec: top_k, ratio: 0.01, error_feedback: true, index_encoding: packed}
      downlink: {codec: fp16}

Byte counts (wire format) are documented in :mod:`fedflat.comm.codecs`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedflat.scenario.variants import VariantConfig, family, family_of


class CodecConfig(VariantConfig):
    """One direction of the channel (an ``uplink:`` or ``downlink:`` block).

    One class per codec (fedflat.scenario.variants), chosen by ``codec``; its fields are
    the codec factory's arguments (fedflat.comm.codecs) plus ``error_feedback``, the
    wrapper every codec can take. ``CodecConfig(**block)`` returns the variant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    codec: str
    error_feedback: bool = Field(
        False,
        description=(
            "Keep what compression dropped (a per-sender residual vector, "
            "4 B/coordinate of sender memory) and add it to the next message."
        ),
    )

    def factory_kwargs(self) -> dict[str, Any]:
        """The codec factory's arguments (error feedback wraps the codec, it is not one)."""
        out = super().factory_kwargs()
        del out["error_feedback"]
        return out


class Fp32Codec(CodecConfig):
    codec: Literal["fp32"] = Field("fp32", description="Uncompressed, 4 B/coordinate.")


class Fp16Codec(CodecConfig):
    codec: Literal["fp16"] = Field("fp16", description="IEEE half, 2 B/coordinate.")


class Bf16Codec(CodecConfig):
    codec: Literal["bf16"] = Field("bf16", description="bfloat16, 2 B/coordinate.")


class QsgdCodec(CodecConfig):
    codec: Literal["qsgd"] = Field(
        "qsgd",
        description="Stochastic quantisation, ceil(log2(2*levels+1)) bits/coordinate + a "
        "4 B norm per bucket_size coordinates.",
    )
    levels: int = Field(
        ..., ge=1, description="Quantisation levels s per sign (count, >=1), required.",
    )
    bucket_size: int | None = Field(
        512,
        ge=0,
        description=(
            "Coordinates per bucket, each bucket quantised with its own 4 B float32 norm "
            "(count; 512 as in the reference implementations). 0 or null: one norm for "
            "the whole vector (variance bound sqrt(d)/levels instead of "
            "min(B/levels^2, sqrt(B)/levels))."
        ),
    )


_INDEX = "How indices travel: int32 (4 B each), packed (ceil(log2 d) bits each)"


class _SparseCodec(CodecConfig):
    """What top_k and random_k share: how many coordinates are kept."""

    k: int | None = Field(None, ge=1, description="Coordinates kept (count, capped at d).")
    ratio: float | None = Field(
        None, gt=0.0, le=1.0,
        description="Fraction of coordinates kept, in (0, 1]; k = max(1, ceil(ratio * d)). "
        "Give ratio or k, not both.",
    )

    @model_validator(mode="after")
    def _k_or_ratio(self) -> _SparseCodec:
        if (self.k is None) == (self.ratio is None):
            raise ValueError(f"codec {self.codec} needs exactly one of k or ratio, "
                             f"got k={self.k}, ratio={self.ratio}")
        return self


class TopKCodec(_SparseCodec):
    codec: Literal["top_k"] = Field(
        "top_k", description="The k largest |values|: k float32 values + indices.",
    )
    index_encoding: Literal["int32", "packed", "seed"] = Field(
        "int32", description=_INDEX + "; seed is random_k's only.",
    )

    @model_validator(mode="after")
    def _no_seed(self) -> TopKCodec:
        if self.index_encoding == "seed":
            raise ValueError("index_encoding 'seed' applies to random_k only "
                             "(top_k indices depend on the values)")
        return self


class RandomKCodec(_SparseCodec):
    codec: Literal["random_k"] = Field(
        "random_k", description="k coordinates drawn at random: k float32 values + indices.",
    )
    unbiased: bool = Field(
        True,
        description="Scale kept values by d/k on decode so the message is an unbiased "
        "estimate (false: send kept values unscaled).",
    )
    index_encoding: Literal["int32", "packed", "seed"] = Field(
        "int32", description=_INDEX + " or seed (one 8 B seed, the receiver regenerates "
        "the indices).",
    )


class SignCodec(CodecConfig):
    codec: Literal["sign"] = Field(
        "sign", description="1 bit/coordinate + a 4 B scale (the mean |value|).",
    )


CodecSpec = family(
    CodecConfig, label="codec", tag="codec", default="fp32",
    variants=(Fp32Codec, Fp16Codec, Bf16Codec, QsgdCodec, TopKCodec, RandomKCodec, SignCodec),
)
CODEC_CONFIGS: dict[str, type[CodecConfig]] = family_of(CodecConfig).variants  # type: ignore[assignment]


class CommConfig(BaseModel):
    """The ``comm:`` block: codecs for the uplink (client -> server) and downlink."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uplink: CodecSpec = Field(
        default_factory=Fp32Codec,
        description=(
            "Codec for client updates (the flat delta y_i - x); with error_feedback "
            "the residual is per-client state. Every message also carries a 4 B header."
        ),
    )
    downlink: CodecSpec = Field(
        default_factory=Fp32Codec,
        description=(
            "Codec for the server broadcast (encoded once per round, every participant "
            "receives the same bytes); with error_feedback the residual is server "
            "state. Every message also carries a 4 B header."
        ),
    )
