"""User-level (client-level) DP at the server: DP-FedAvg and adaptive clipping.

Server steps (``fedflat.server.pipeline.ServerStep``) that make one round's aggregate
(ε, δ)-DP with respect to adding or removing one client. Where each goes:

* Fixed clip (DP-FedAvg, McMahan et al. 2018, ALGORITHMS.md §4.3)::

      Pipeline([clip_deltas(clip_norm=S),
                gaussian_sum_noise(noise_multiplier=z, clip_norm=S,
                                   expected_clients=qN),
                fedavg(lr=1.0)])    # or fedavgm / fedadam: any server optimizer

  ``gaussian_sum_noise`` IS the aggregation step (it replaces ``rule_step``): the rules
  of ``fedflat.server.rules`` normalise by the realised weights, while DP-FedAvg needs
  the unweighted SUM over the fixed denominator qN (or the weighted sum over qW). It
  refuses rows longer than S, so a missing ``clip_deltas`` is caught.

* Adaptive clip (Andrew et al. 2021, §4.4)::

      Pipeline([adaptive_clipping(initial_clip=0.1, target_quantile=0.5,
                                  clip_lr=0.2, count_noise=m/20,
                                  noise_multiplier=z, expected_clients=m),
                fedavg(lr=1.0)])

  One step clips, counts, sums, noises and updates the clip norm (kept in its state).

DP-FedSAM's client-side noise (Shi et al. 2023, §4.5) is not a server step: each client
clips and noises its own delta in its uplink chain (``fedflat.privacy.client_noise``), and
the server takes the uniform mean.

Accounting (the lead's part; user level, separate from any sample-level budget):
record ``accountant.step(z, q, 1)`` once per round with q = expected clients per
round / population N (Poisson cohort sampling, ``sample_cohort(method="poisson")``; a
uniform fixed-size cohort is a different mechanism) and T = rounds. With adaptive
clipping record the TOTAL z (the delta sum gets z_Δ ≥ z, see
``adaptive_clip_noise_split``).

All noise comes from the generator handed to ``apply`` (the ``"noise"`` stream); it is
not cryptographic (fine for simulation, opacus#616).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedflat.models.flat import Segment
from fedflat.privacy.accounting import adaptive_clip_noise_split
from fedflat.server.pipeline import Metrics, ServerRound, ServerStep

CLIP_UPDATES: tuple[str, ...] = ("geometric", "arithmetic")

_TINY = 1e-12
# Relative slack when checking that rows were clipped (float32 rounding of the norm).
_CLIP_SLACK = 1e-4


# ----------------------------------------------------------------------------- checks
def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def checked_number(name: str, value: Any, *, strict: bool) -> float:
    """``value`` as a float; raises ValueError naming ``name`` unless finite and > 0
    (``strict``) or >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _require(
        ok and math.isfinite(value), f"{name} must be a finite number, got {value!r}"
    )
    _require(
        value > 0 if strict else value >= 0,
        f"{name} must be {'>' if strict else '>='} 0, got {value!r}",
    )
    return float(value)


# ----------------------------------------------------------------------------- helpers
def clip_rows(
    x: Tensor, clip_norm: float | Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Scale each row of ``x`` [m, d] to L2 norm ≤ ``clip_norm`` (flat clipping).

    Non-finite rows become zero rows (a zero contribution keeps the sensitivity ≤ S).

    Returns:
        ``(clipped [m, d], norms [m] before clipping (inf for non-finite rows),
        clipped mask [m])``.
    """
    finite = torch.isfinite(x).all(1)  # [m]
    x = torch.where(finite.unsqueeze(1), x, x.new_zeros(()))
    norms = torch.linalg.vector_norm(x, dim=1)  # [m]
    factor = (clip_norm / norms.clamp_min(_TINY)).clamp(max=1.0)  # 1 for zero rows
    norms = torch.where(finite, norms, torch.full_like(norms, math.inf))
    return x * factor.unsqueeze(1), norms, factor < 1.0


def clip_rows_per_tensor(
    x: Tensor, clip_norm: float, segments: Sequence[Segment]
) -> tuple[Tensor, Tensor]:
    """Clip every parameter tensor of every row to ``clip_norm`` separately.

    As DP-FedSAM's released code (each state-dict entry clipped to C); the row's
    sensitivity is then C√K for K tensors. Non-finite rows become zero rows.

    Returns:
        ``(clipped [m, d], fraction of (row, tensor) blocks scaled down as a 0-d
        tensor)``.
    """
    finite = torch.isfinite(x).all(1, keepdim=True)
    x = torch.where(finite, x, x.new_zeros(()))
    out = torch.empty_like(x)
    scaled = torch.zeros((), dtype=torch.float64)
    for s in segments:  # a loop over tensors, each block vectorised over rows
        block = x[:, s.slice]
        n = torch.linalg.vector_norm(block, dim=1, keepdim=True)
        f = (clip_norm / n.clamp_min(_TINY)).clamp(max=1.0)
        out[:, s.slice] = block * f
        scaled += (f < 1.0).sum()
    frac = scaled / max(x.shape[0] * len(segments), 1)
    return out, frac


def _check_clipped(deltas: Tensor, clip_norm: float) -> None:
    if deltas.shape[0] == 0:
        return
    longest = float(torch.linalg.vector_norm(deltas, dim=1).max())
    if not longest <= clip_norm * (1.0 + _CLIP_SLACK):
        raise ValueError(
            f"a client delta has norm {longest:.6g} > clip_norm {clip_norm}: put "
            "clip_deltas(clip_norm=...) with the same clip_norm before this step"
        )


def _normal(shape: tuple[int, ...], gen: torch.Generator, like: Tensor) -> Tensor:
    """Standard normals drawn from ``gen`` on its own device, moved next to ``like``."""
    z = torch.randn(shape, generator=gen, device=gen.device, dtype=like.dtype)
    return z.to(like.device)


def capped_weights(num_samples: Tensor, weight_cap: float) -> Tensor:
    """DP-FedAvg per-user weights w_k = min(n_k / ŵ, 1) (McMahan et al. 2018, §4.3).

    Args:
        num_samples: [N] or [m] sample counts n_k.
        weight_cap: ŵ > 0.

    Returns:
        Float weights in [0, 1] (float64).
    """
    cap = checked_number("weight_cap", weight_cap, strict=True)
    return (torch.as_tensor(num_samples, dtype=torch.float64) / cap).clamp(max=1.0)


# ----------------------------------------------------------------------------- steps
def clip_deltas(*, clip_norm: float) -> ServerStep:
    """Clip each client delta (row of ``round.deltas``) to L2 norm ≤ S (flat).

    Place first, before ``gaussian_sum_noise``. Non-finite rows are replaced by zeros.

    Args:
        clip_norm: S > 0.

    Returns:
        A ``ServerStep`` named ``"dp_clip"``. Metrics ``dp/frac_clipped``,
        ``dp/update_norm_mean`` (mean norm before clipping over finite rows; not
        private, logging only), ``dp/num_nonfinite``.

    References:
        McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent
        Language Models", ICLR 2018, https://arxiv.org/abs/1710.06963 (§4.3).
    """
    s = checked_number("clip_norm", clip_norm, strict=True)

    def apply(
        rnd: ServerRound, state: Any, gen: torch.Generator
    ) -> tuple[ServerRound, Any, Metrics]:
        clipped, norms, mask = clip_rows(rnd.deltas, s)
        fin = torch.isfinite(norms)
        m = max(int(norms.numel()), 1)
        metrics = {
            "dp/frac_clipped": float(mask.sum()) / m,
            "dp/update_norm_mean": float(norms[fin].mean()) if bool(fin.any()) else 0.0,
            "dp/num_nonfinite": float((~fin).sum()),
        }
        return rnd.with_(deltas=clipped), state, metrics

    return ServerStep("dp_clip", init=lambda params: (), apply=apply)


def cohort_noise_topup(*, noise_multiplier: float, clip_norm: float,
                       expected_clients: float) -> ServerStep:
    """Top up client-side noise when fewer clients arrive than it was calibrated for.

    With ``noise_placement: client`` each of the m' arriving clients adds N(0, σ²C²/m)
    for the EXPECTED cohort m, so the sum carries variance m'σ²C²/m: a multiplier
    σ·√(m'/m), below the accounted σ whenever m' < m (a small Poisson draw, dropped
    stragglers). This step, after the uniform mean, adds the missing
    N(0, σ²C²(1 − m'/m)) to the sum (divided by m' on the mean) so that the released
    model always carries multiplier ≥ σ. In such rounds the guarantee against the server
    itself is the clients' σ√(m'/m) only (it adds the rest); the ledger records σ for the
    released model. An empty cohort releases nothing (zero update).

    Returns:
        A ``ServerStep`` named ``"dp_cohort_topup"``; metric ``dp/topup_std`` (std added
        to the mean, 0 when m' ≥ m).
    """
    z = checked_number("noise_multiplier", noise_multiplier, strict=False)
    c = checked_number("clip_norm", clip_norm, strict=True)
    m = checked_number("expected_clients", expected_clients, strict=True)

    def apply(rnd: ServerRound, state: Any, gen: torch.Generator
              ) -> tuple[ServerRound, Any, Metrics]:
        _require(rnd.aggregate is not None,
                 "cohort_noise_topup follows the uniform mean (an aggregate must be set)")
        arrived = rnd.deltas.shape[0]
        std = 0.0
        if 0 < arrived < m and z > 0:
            std = z * c * math.sqrt(1.0 - arrived / m) / arrived
            agg = rnd.aggregate + _normal(tuple(rnd.aggregate.shape), gen, rnd.aggregate) * std
            rnd = rnd.with_(aggregate=agg)
        return rnd, state, {"dp/topup_std": std}

    return ServerStep("dp_cohort_topup", init=lambda params: (), apply=apply)


def gaussian_sum_noise(
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_clients: float,
    weight_cap: float | None = None,
    total_weight: float | None = None,
) -> ServerStep:
    """DP-FedAvg aggregation: (Σ_k w_k Δ_k + N(0, z²S² I)) / fixed denominator.

    Noise goes on the SUM (std z·S); the aggregate divides by a constant, never by the
    realised cohort:

    * unweighted (default): w_k = 1, denominator qN = ``expected_clients``, so the noise
      std on the aggregate is zS/(qN);
    * weighted (``weight_cap`` ŵ and ``total_weight`` W given): w_k = min(n_k/ŵ, 1) from
      ``round.weights`` (sample counts), denominator qW with q = expected_clients / N
      (N = ``round.num_clients``), noise std zS/(qW) (McMahan et al. 2018's
      fixed-denominator estimator; W = Σ over ALL N users of w_k, see
      ``capped_weights``).

    This step sets ``round.aggregate`` (it replaces an aggregation rule) and must follow
    ``clip_deltas(clip_norm=S)``: rows longer than S raise. An empty cohort gives pure
    noise / denominator.

    Args:
        noise_multiplier: z ≥ 0 (0 = no noise, not private).
        clip_norm: S > 0, the bound ``clip_deltas`` enforced.
        expected_clients: qN > 0, expected clients per round.
        weight_cap: ŵ > 0 for the weighted estimator, else None.
        total_weight: W > 0, required with ``weight_cap``.

    Returns:
        A ``ServerStep`` named ``"dp_aggregate"``. Metrics ``dp/noise_std`` (on the
        aggregate), ``dp/num_clients`` (realised cohort).

    Raises:
        ValueError: bad hyperparameter (factory); an aggregate already set, or an
            unclipped row (apply).

    References:
        McMahan et al., ICLR 2018, https://arxiv.org/abs/1710.06963
        (ALGORITHMS.md §4.3).
    """
    z = checked_number("noise_multiplier", noise_multiplier, strict=False)
    s = checked_number("clip_norm", clip_norm, strict=True)
    m_exp = checked_number("expected_clients", expected_clients, strict=True)
    _require(
        (weight_cap is None) == (total_weight is None),
        "give both weight_cap and total_weight (weighted estimator) or neither, got "
        f"weight_cap={weight_cap}, total_weight={total_weight}",
    )
    cap = None if weight_cap is None else checked_number("weight_cap", weight_cap, strict=True)
    w_total = (
        None
        if total_weight is None
        else checked_number("total_weight", total_weight, strict=True)
    )

    def apply(
        rnd: ServerRound, state: Any, gen: torch.Generator
    ) -> tuple[ServerRound, Any, Metrics]:
        _require(
            rnd.aggregate is None,
            "gaussian_sum_noise aggregates the deltas itself: remove the aggregation "
            "rule before it",
        )
        _check_clipped(rnd.deltas, s)
        d = rnd.params.numel()
        if cap is None or w_total is None:  # the factory set both or neither
            denom = m_exp
            total = (
                rnd.deltas.sum(0) if rnd.deltas.shape[0] else rnd.params.new_zeros(d)
            )
        else:
            denom = m_exp / rnd.num_clients * w_total  # q·W
            wk = capped_weights(rnd.weights, cap).to(rnd.deltas)  # [m], each ≤ 1
            total = wk @ rnd.deltas if rnd.deltas.shape[0] else rnd.params.new_zeros(d)
        if z > 0:
            total = total + _normal((d,), gen, total) * (z * s)
        metrics = {
            "dp/noise_std": z * s / denom,
            "dp/num_clients": float(rnd.deltas.shape[0]),
        }
        return rnd.with_(aggregate=total / denom), state, metrics

    return ServerStep("dp_aggregate", init=lambda params: (), apply=apply)


def adaptive_clipping(
    *,
    initial_clip: float,
    target_quantile: float,
    clip_lr: float,
    count_noise: float,
    noise_multiplier: float,
    expected_clients: float,
    update: str = "geometric",
) -> ServerStep:
    """DP-FedAvg with the clip norm tracking a quantile of delta norms, privately.

    Per round with clip C_t (from the step state):

    1. b_i = 1[‖Δ_i‖ ≤ C_t]; each Δ_i is clipped to C_t;
    2. aggregate = (Σ clipped Δ_i + N(0, z_Δ² C_t² I)) / m (m = ``expected_clients``,
       unweighted, fixed denominator) with z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2);
    3. b̄ = clamp((Σ (b_i − ½) + N(0, σ_b²)) / m + ½, 0, 1) — the bits centred at ±½ so
       the count has sensitivity ½, as the TF-Privacy implementation does;
    4. C_{t+1} = C_t·exp(−η_C(b̄ − γ)) (geometric) or C_t − η_C(b̄ − γ) (arithmetic,
       kept ≥ 1e-12 so that a clip norm of 0 cannot stall the estimate).

    Account the TOTAL z with q = m / N per round. With z = 0 (no privacy) the delta sum
    gets no noise and σ_b may be anything ≥ 0.

    Args:
        initial_clip: C_0 > 0.
        target_quantile: γ ∈ (0, 1).
        clip_lr: η_C > 0.
        count_noise: σ_b ≥ 0 (in counts; default in the scenario m/20); needs
            z < 2σ_b when z > 0.
        noise_multiplier: total z ≥ 0.
        expected_clients: m > 0.
        update: "geometric" or "arithmetic".

    Returns:
        A ``ServerStep`` named ``"dp_adaptive_clip"`` (sets ``round.aggregate``; put a
        server optimizer after it). State ``{"clip_norm": 0-d float64 tensor}``. Metrics
        ``dp/clip_norm`` (C_t used), ``dp/clip_norm_next``, ``dp/unclipped_frac``
        (noisy b̄), ``dp/update_noise_multiplier`` (z_Δ), ``dp/frac_clipped`` and
        ``dp/update_norm_mean`` (not private, logging only).

    References:
        Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
        Adaptive Clipping", NeurIPS 2021, https://arxiv.org/abs/1905.03871 (§4.4).
    """
    c0 = checked_number("initial_clip", initial_clip, strict=True)
    gamma = checked_number("target_quantile", target_quantile, strict=True)
    _require(gamma < 1.0, f"target_quantile must be < 1, got {target_quantile}")
    eta = checked_number("clip_lr", clip_lr, strict=True)
    sigma_b = checked_number("count_noise", count_noise, strict=False)
    z = checked_number("noise_multiplier", noise_multiplier, strict=False)
    m_exp = checked_number("expected_clients", expected_clients, strict=True)
    _require(
        update in CLIP_UPDATES,
        f"update must be one of {list(CLIP_UPDATES)}, got {update!r}",
    )
    # Raises unless z < 2σ_b; logs when z_Δ ≥ 2z.
    z_delta = (
        adaptive_clip_noise_split(noise_multiplier=z, count_noise=sigma_b)
        if z > 0
        else 0.0
    )

    def init(params: Tensor) -> dict[str, Tensor]:
        return {"clip_norm": torch.tensor(c0, dtype=torch.float64)}

    def apply(
        rnd: ServerRound, state: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[ServerRound, dict[str, Tensor], Metrics]:
        _require(
            rnd.aggregate is None,
            "adaptive_clipping aggregates the deltas itself: remove the aggregation "
            "rule before it",
        )
        c = float(state["clip_norm"])
        d = rnd.params.numel()
        clipped, norms, mask = clip_rows(rnd.deltas, c)
        m = clipped.shape[0]
        total = clipped.sum(0) if m else rnd.params.new_zeros(d)
        if z_delta > 0:
            total = total + _normal((d,), gen, total) * (z_delta * c)
        # Non-finite rows were zeroed (norm 0 ≤ C): count them as unclipped bits, which
        # is what the zero contribution they now make is.
        bits = (torch.nan_to_num(norms, posinf=0.0) <= c).to(torch.float64)  # [m]
        count = float((bits - 0.5).sum())
        if sigma_b > 0:
            noise_b = torch.randn(
                (), generator=gen, device=gen.device, dtype=torch.float64
            )
            count += float(noise_b) * sigma_b
        b_bar = min(max(count / m_exp + 0.5, 0.0), 1.0)
        if update == "geometric":
            c_next = c * math.exp(-eta * (b_bar - gamma))
        else:
            c_next = max(c - eta * (b_bar - gamma), _TINY)
        fin = torch.isfinite(norms)
        metrics = {
            "dp/clip_norm": c,
            "dp/clip_norm_next": c_next,
            "dp/unclipped_frac": b_bar,
            "dp/update_noise_multiplier": z_delta,
            "dp/frac_clipped": float(mask.sum()) / max(m, 1),
            "dp/update_norm_mean": float(norms[fin].mean()) if bool(fin.any()) else 0.0,
            "dp/noise_std": z_delta * c / m_exp,
        }
        new_state = {"clip_norm": torch.tensor(c_next, dtype=torch.float64)}
        return rnd.with_(aggregate=total / m_exp), new_state, metrics

    return ServerStep("dp_adaptive_clip", init=init, apply=apply)

