"""The ``system:`` block of a scenario: devices, network, availability, deadlines.

Per-client quantities (compute speed, bandwidths, latencies) are distributions drawn
once per run (see :func:`fedflat.comm.system.client_profiles`). Each is written as a
number (a constant), ``{kind: lognormal, mean: ..., sigma: ...}`` or
``{kind: trace, path: ...}`` (a CSV of ``client_id,value`` rows; an optional header
line is skipped; relative paths are resolved against the scenario file's folder).
Example::

    system:
      compute_speed: {kind: lognormal, mean: 200.0, sigma: 0.5}  # samples/s
      uplink_bandwidth: 1.25e6                                     # bytes/s: 10 Mbit/s
      downlink_bandwidth: 1.25e7
      uplink_latency: 0.05                                         # s
      availability: 0.8
      dropout: 0.05
      deadline_s: 60.0
      straggler_policy: partial

A missing key means "no limit": no ``compute_speed`` -> computing takes no simulated
time; no bandwidth -> transfers take only their latency; no latency -> 0 s.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


class ConstantDist(BaseModel):
    """The same value for every client."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["constant"] = Field(
        "constant", description="constant (a bare number means this kind)."
    )
    value: float = Field(ge=0.0, description="The value, in the unit of the field.")


class LogNormalDist(BaseModel):
    """Log-normal across clients: ``log v ~ N(log(mean) - sigma^2 / 2, sigma^2)``.

    Parameterised by the distribution's own mean (in the unit of the field) so that
    ``sigma`` changes the spread, not the average.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["lognormal"] = Field(description="lognormal.")
    mean: float = Field(gt=0.0, description="Mean of the values (unit of the field).")
    sigma: float = Field(
        ge=0.0, description="Standard deviation of log(value) (unitless)."
    )


class TraceDist(BaseModel):
    """Per-client values read from a CSV file with rows ``client_id,value``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["trace"] = Field(description="trace.")
    path: str = Field(description="CSV path (relative to the scenario file's folder).")


def _number_to_constant(v: Any) -> Any:
    # A bare number is the common case: `uplink_bandwidth: 1.25e6`.
    if isinstance(v, int | float) and not isinstance(v, bool):
        return {"kind": "constant", "value": v}
    return v


Dist = Annotated[
    ConstantDist | LogNormalDist | TraceDist,
    Field(discriminator="kind"),
    BeforeValidator(_number_to_constant),
]


class AvailabilityTrace(BaseModel):
    """Availability read from a CSV of ``client_id,round,available`` rows (0/1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(description="CSV path (relative to the scenario file's folder).")
    missing: Literal["available", "unavailable"] = Field(
        "available",
        description="State of a (client, round) pair that the trace does not list.",
    )


class AsyncConfig(BaseModel):
    """Buffered asynchronous aggregation (FedBuff) instead of synchronous rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    concurrency: int = Field(
        ge=1,
        description="Clients training at the same time (count, <= number of clients).",
    )
    buffer_size: int = Field(
        ge=1, description="Updates K collected before each server step (count)."
    )
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial",
        description=(
            "Weight of an update of staleness s (server steps since its model was "
            "sent): constant 1; polynomial (1+s)^-a; "
            "hinge 1 if s <= b else 1/(a(s-b)+1)."
        ),
    )
    staleness_a: float = Field(
        0.5, ge=0.0, description="Exponent (polynomial) or slope (hinge) a (unitless)."
    )
    staleness_b: float = Field(
        4.0,
        ge=0.0,
        description="Hinge: staleness b up to which weight is 1 (server steps).",
    )


_RATE_FIELDS = ("compute_speed", "uplink_bandwidth", "downlink_bandwidth")


class SystemConfig(BaseModel):
    """The ``system:`` block: device and network model and the straggler policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute_speed: Dist | None = Field(
        None,
        description=(
            "Training throughput per client (samples/second). None: computing takes no "
            "simulated time. A bare number is a constant."
        ),
    )
    downlink_bandwidth: Dist | None = Field(
        None,
        description=(
            "Server -> client bandwidth (bytes/second). None: unlimited. A bare "
            "number is a constant."
        ),
    )
    uplink_bandwidth: Dist | None = Field(
        None,
        description=(
            "Client -> server bandwidth (bytes/second). None: unlimited. A bare "
            "number is a constant."
        ),
    )
    downlink_latency: Dist | None = Field(
        None,
        description="Fixed time added to each download (seconds). None: 0. A bare number is "
        "a constant.",
    )
    uplink_latency: Dist | None = Field(
        None,
        description="Fixed time added to each upload (seconds). None: 0. A bare number is "
        "a constant.",
    )
    availability: Annotated[float, Field(ge=0.0, le=1.0)] | AvailabilityTrace = Field(
        1.0,
        description=(
            "Probability that a client is available in a round (independent per client "
            "and round), or a trace of client_id,round,available rows."
        ),
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Probability that a participant drops out mid-round (at a uniform "
            "fraction of its work); its update is lost."
        ),
    )
    deadline_s: float | None = Field(
        None,
        gt=0.0,
        description="Round deadline (seconds from the round start). None: none.",
    )
    straggler_policy: Literal["drop", "partial"] = Field(
        "drop",
        description=(
            "drop (FedAvg): discard clients that miss the deadline and the "
            "straggler_fraction stragglers; partial (FedProx): keep their partial work "
            "(as many local steps as fit before the deadline, at least 1; stragglers "
            "run a uniform number of epochs in {1..E-1})."
        ),
    )
    straggler_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "FedProx-style systems heterogeneity: this fraction of each round's "
            "participants (round(fraction * m) clients) are stragglers."
        ),
    )
    asynchronous: AsyncConfig | None = Field(
        None, description="FedBuff-style asynchronous mode; None: synchronous rounds."
    )

    @model_validator(mode="after")
    def _check(self) -> SystemConfig:
        for name in _RATE_FIELDS:
            dist = getattr(self, name)
            if isinstance(dist, ConstantDist) and dist.value <= 0.0:
                raise ValueError(f"{name}.value must be > 0 (a rate), got {dist.value}")
        if self.asynchronous is not None:
            if self.deadline_s is not None:
                raise ValueError(
                    "deadline_s has no meaning with asynchronous (no rounds)"
                )
            if self.straggler_fraction > 0.0:
                raise ValueError("straggler_fraction has no meaning with asynchronous")
            if self.availability != 1.0:
                raise ValueError(
                    "availability is per round; asynchronous mode has no rounds "
                    "(it picks among idle clients)"
                )
        return self
