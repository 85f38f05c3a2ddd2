"""DP-FedSAM's client-side privatisation as uplink steps: clip the delta, add noise.

With ``privacy.user_level.noise_placement: client`` each client clips its own delta to C
and adds N(0, σ²C²/m · I) before anything leaves the device (Shi et al. 2023,
ALGORITHMS.md §4.5); the runtime chains ::

    chain(clip_delta(clip_norm=C), gaussian_noise(noise_multiplier=σ, clip_norm=C,
          clients_per_round=m), encode(codec))          # fedflat.client.uplink

The m clients' noise sums to N(0, σ²C² I), so the server's UNIFORM mean of the m noisy
deltas carries N(0, σ²C²/m² I) against a sensitivity C/m: noise multiplier σ, as central
DP-FedAvg. A sample-weighted mean would not (the heaviest client's multiplier shrinks to
σ·√(Σw²)/(√m·w_max)), which is why the scenario refuses ``weighting: samples`` with this
placement.

``clip_scope: per_tensor`` clips each of the K parameter tensors to C (the released code):
the delta's L2 sensitivity is then C√K while the noise std is still σC/√m per coordinate,
so the accountant must record σ/√K (``accounted_noise_multiplier``).

The noise comes from the ``"client_noise"`` stream of (seed, round, client): identical on
every backend; not cryptographic (fine for simulation, opacus#616).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fedflat.client.uplink import Metrics, State, UplinkContext, UplinkStep
from fedflat.models.flat import Segment
from fedflat.privacy.central import checked_number, clip_rows, clip_rows_per_tensor

CLIP_SCOPES: tuple[str, ...] = ("global", "per_tensor")
NOISE_PURPOSE = "client_noise"  # the fedflat.rng purpose of the clients' DP noise


def accounted_noise_multiplier(noise_multiplier: float, *, clip_scope: str,
                               num_tensors: int) -> float:
    """The noise multiplier of the released mean relative to its L2 sensitivity.

    ``global``: σ. ``per_tensor`` with K tensors each clipped to C: the sensitivity of one
    client's delta is C√K and the noise std σC per coordinate (on the sum), so σ/√K.

    Raises:
        ValueError: an unknown scope or K < 1.
    """
    if clip_scope not in CLIP_SCOPES:
        raise ValueError(f"clip_scope must be one of {list(CLIP_SCOPES)}, got {clip_scope!r}")
    if clip_scope == "global":
        return float(noise_multiplier)
    if num_tensors < 1:
        raise ValueError(f"num_tensors must be >= 1, got {num_tensors}")
    return float(noise_multiplier) / math.sqrt(num_tensors)


def clip_delta(*, clip_norm: float, clip_scope: str = "global",
               segments: Sequence[Segment] | None = None) -> UplinkStep:
    """Clip the client's delta to L2 norm ≤ C (whole vector, or each parameter tensor).

    A non-finite delta becomes zero (a zero contribution keeps the sensitivity).

    Args:
        clip_norm: C > 0.
        clip_scope: "global" (sensitivity C) or "per_tensor" (each tensor to C, as the
            released DP-FedSAM code; sensitivity C√K).
        segments: ``FlatModel.segments``, required with ``per_tensor``.

    Returns:
        An ``UplinkStep`` named ``"clip"`` (stateless, no metrics: whether a client was
        clipped is a bit about its data that would travel outside the DP guarantee).
    """
    c = checked_number("clip_norm", clip_norm, strict=True)
    if clip_scope not in CLIP_SCOPES:
        raise ValueError(f"clip_scope must be one of {list(CLIP_SCOPES)}, got {clip_scope!r}")
    if clip_scope == "per_tensor" and not segments:
        raise ValueError("clip_scope 'per_tensor' needs segments (FlatModel.segments)")
    segs = tuple(segments or ())

    def update(delta: Tensor, state: State, ctx: UplinkContext) -> tuple[Tensor, State, Metrics]:
        row = delta.unsqueeze(0)
        if clip_scope == "global":
            clipped = clip_rows(row, c)[0]
        else:
            clipped = clip_rows_per_tensor(row, c, segs)[0]
        return clipped[0], state, {}

    return UplinkStep("clip", init=lambda delta: {}, update=update)


def gaussian_noise(*, noise_multiplier: float, clip_norm: float,
                   clients_per_round: float) -> UplinkStep:
    """Add N(0, σ²C²/m · I) to the (clipped) delta, drawn from the client's own stream.

    Args:
        noise_multiplier: σ ≥ 0 (0 adds nothing: not private).
        clip_norm: C > 0, the bound the preceding ``clip_delta`` enforced.
        clients_per_round: m > 0, the expected cohort (the m in σ²C²/m).

    Returns:
        An ``UplinkStep`` named ``"noise"`` (stateless); metric ``dp/noise_std`` (per
        coordinate of this client's delta).

    References:
        Shi et al., "Make Landscape Flatter in Differentially Private Federated Learning",
        CVPR 2023, https://arxiv.org/abs/2303.11242 (ALGORITHMS.md §4.5).
    """
    z = checked_number("noise_multiplier", noise_multiplier, strict=False)
    c = checked_number("clip_norm", clip_norm, strict=True)
    m = checked_number("clients_per_round", clients_per_round, strict=True)
    std = z * c / math.sqrt(m)

    def update(delta: Tensor, state: State, ctx: UplinkContext) -> tuple[Tensor, State, Metrics]:
        if std > 0:
            gen = ctx.stream(NOISE_PURPOSE)
            z_ = torch.randn(delta.shape, generator=gen, device=gen.device, dtype=delta.dtype)
            delta = delta + z_.to(delta.device) * std
        return delta, state, {"dp/noise_std": std}

    return UplinkStep("noise", init=lambda delta: {}, update=update)


def client_noise_steps(*, clip_norm: float, noise_multiplier: float, clients_per_round: float,
                       clip_scope: str = "global",
                       segments: Sequence[Segment] | None = None) -> tuple[UplinkStep, ...]:
    """``(clip_delta, gaussian_noise)``: DP-FedSAM's privatisation, in that order."""
    return (clip_delta(clip_norm=clip_norm, clip_scope=clip_scope, segments=segments),
            gaussian_noise(noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                           clients_per_round=clients_per_round))
