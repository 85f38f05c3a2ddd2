"""Empirical privacy auditing in one training run.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
https://arxiv.org/abs/2305.08846. ``m`` canaries are each included independently with
probability ½; after the run, the auditor guesses "in" for the k₊ highest scores and "out"
for the k₋ lowest. If v of the r = k₊ + k₋ guesses are right, an (ε, δ)-DP mechanism would
produce that many correct guesses with probability at most

    P(ε) = P[Bin(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Bin(r, p) < v] / i,
    p = e^ε / (1 + e^ε),

so ε_lb = sup{ε : P(ε) < α} is a lower bound on ε with confidence 1 − α. A correct
implementation is flagged (ε_lb > claimed ε) with probability at most α.

The canary used here is the cheap one of PRIVACY.md: a dummy parameter block of size m
that the model never uses; canary i contributes c·e_i to the (clipped) sum and its score is
the sum over steps of coordinate i of the released noisy aggregate. ``canary_scores`` and
``audit_released`` take those released sums, so real fedflat mechanisms can be driven
through the same audit; ``simulate_gaussian_sum`` produces them for an idealised DP-SGD /
DP-FedAvg step with injectable faults.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch
from scipy import special, stats
from torch import Tensor

from fedflat.privacy.accounting import AccountantName, epsilon

Fault = Literal["noise_off", "noise_scaled", "clipping_off", "sample_every_step"]
FAULTS: tuple[str, ...] = (
    "noise_off",
    "noise_scaled",
    "clipping_off",
    "sample_every_step",
)
_GRID_POINTS = 256  # ε grid on which P(ε) < α is scanned before the final bisection


class AuditResult(NamedTuple):
    """Outcome of one audit.

    Attributes:
        epsilon_lower_bound: ε_lb at confidence 1 − α.
        claimed_epsilon: ε the accountant reports for the mechanism as configured.
        flagged: ``epsilon_lower_bound > claimed_epsilon`` (the claim is refuted).
        num_canaries: m.
        guesses: r = k₊ + k₋.
        correct: v, the number of correct guesses.
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    flagged: bool
    num_canaries: int
    guesses: int
    correct: int


def _p_value_bound(
    eps: np.ndarray, *, num_canaries: int, guesses: int, correct: int, delta: float
) -> np.ndarray:
    """P(ε) of the module docstring, vectorised over ``eps`` (shape [G])."""
    r, v = guesses, correct
    p = special.expit(eps)  # e^ε / (1 + e^ε), stable for large ε
    out = stats.binom.sf(v - 1, r, p)  # P[Bin ≥ v]
    if delta > 0.0 and v > 0:
        ks = np.arange(-1, v)  # cdf at k = −1 .. v−1
        cdf = stats.binom.cdf(ks[None, :], r, p[:, None])  # [G, v+1]; cdf(−1) = 0
        i = np.arange(1, v + 1)  # [v]
        # P[v − i ≤ Bin < v] = cdf(v − 1) − cdf(v − i − 1); column of k is k + 1.
        window = cdf[:, v : v + 1] - cdf[:, v - i]  # [G, v]
        out = out + 2.0 * num_canaries * delta * np.max(window / i[None, :], axis=1)
    return np.asarray(out, dtype=np.float64)


def epsilon_lower_bound_from_counts(
    *,
    num_canaries: int,
    guesses: int,
    correct: int,
    delta: float,
    alpha: float = 0.05,
) -> float:
    """ε_lb = sup{ε : P(ε) < α} for r guesses of which v are correct (Steinke et al. 2023).

    Args:
        num_canaries: m, the number of canaries (enters through the 2mδ term).
        guesses: r ≤ m.
        correct: v ≤ r.
        delta: δ ∈ [0, 1) of the claim being audited.
        alpha: significance level α ∈ (0, 1).

    Returns:
        ε_lb ≥ 0 (0 when even ε = 0 explains v correct guesses).

    Raises:
        ValueError: on inconsistent counts or out-of-range δ, α.
    """
    m, r, v = int(num_canaries), int(guesses), int(correct)
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"need 0 <= correct <= guesses <= num_canaries, got correct={correct}, "
            f"guesses={guesses}, num_canaries={num_canaries}"
        )
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if v == 0:
        return 0.0

    def bound(e: float) -> float:
        return float(
            _p_value_bound(
                np.array([e]), num_canaries=m, guesses=r, correct=v, delta=delta
            )[0]
        )

    if bound(0.0) >= alpha:
        return 0.0
    # P[Bin ≥ v] alone is increasing in ε, so once it reaches α the set {P < α} is over.
    # The 2mδ term need not be monotone: scan a grid below that point and take the last
    # point with P < α, then bisect to the crossing after it.
    top = 1.0
    while stats.binom.sf(v - 1, r, special.expit(top)) < alpha:
        top *= 2.0
        if top > 1e4:  # unreachable for α < 1; guards a pathological input
            return math.inf
    grid = np.linspace(0.0, top, _GRID_POINTS + 1)
    below = np.flatnonzero(
        _p_value_bound(grid, num_canaries=m, guesses=r, correct=v, delta=delta) < alpha
    )
    k = int(below[-1])
    if k == len(grid) - 1:
        return float(grid[-1])
    lo, hi = float(grid[k]), float(grid[k + 1])
    for _ in range(60):  # interval width top/256 → below 1e-15 relative
        mid = 0.5 * (lo + hi)
        if bound(mid) < alpha:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-10 * max(1.0, hi):
            break
    return lo


def guess_counts(
    scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """Guess "in" for the k₊ highest scores, "out" for the k₋ lowest; return (r, v).

    Ties are broken by canary index (a stable sort), which is fixed before the run.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included).reshape(-1)
    if inc.dtype != np.bool_:
        raise ValueError(f"included must be a boolean array, got dtype {inc.dtype}")
    m = s.shape[0]
    if inc.shape[0] != m:
        raise ValueError(f"scores has {m} entries but included has {inc.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"need k_plus >= 0, k_minus >= 0 and k_plus + k_minus <= {m} canaries, "
            f"got k_plus={k_plus}, k_minus={k_minus}"
        )
    order = np.argsort(s, kind="stable")
    guess_out = order[:k_minus]
    guess_in = order[m - k_plus :]
    correct = int(inc[guess_in].sum()) + int((~inc[guess_out]).sum())
    return k_plus + k_minus, correct


def epsilon_lower_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    k_plus: int,
    k_minus: int,
    delta: float,
    alpha: float = 0.05,
) -> float:
    """One-run ε lower bound from canary scores (Steinke, Nasr, Jagielski 2023).

    Args:
        scores: [m] canary scores (higher = more likely included).
        included: [m] bool, whether canary i was really included.
        k_plus: number of "in" guesses (highest scores).
        k_minus: number of "out" guesses (lowest scores).
        delta: δ of the claim.
        alpha: significance level; split it yourself if several (k₊, k₋) are tried
            (``epsilon_lower_bound_multi`` does).

    Returns:
        ε_lb with confidence 1 − α.
    """
    r, v = guess_counts(scores, included, k_plus=k_plus, k_minus=k_minus)
    return epsilon_lower_bound_from_counts(
        num_canaries=len(scores), guesses=r, correct=v, delta=delta, alpha=alpha
    )


def epsilon_lower_bound_multi(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    choices: list[tuple[int, int]],
    delta: float,
    alpha: float = 0.05,
) -> float:
    """Best ε_lb over (k₊, k₋) choices fixed in advance, α split evenly (Bonferroni)."""
    if not choices:
        raise ValueError("choices must list at least one (k_plus, k_minus) pair")
    a = alpha / len(choices)
    return max(
        epsilon_lower_bound(
            scores, included, k_plus=kp, k_minus=km, delta=delta, alpha=a
        )
        for kp, km in choices
    )


def draw_inclusion(num_canaries: int, generator: torch.Generator) -> np.ndarray:
    """Each canary included independently with probability ½; bool array [m]."""
    if num_canaries < 1:
        raise ValueError(f"num_canaries must be >= 1, got {num_canaries}")
    bits = torch.rand(num_canaries, generator=generator, dtype=torch.float64) < 0.5
    return bits.numpy()


def canary_scores(released: Tensor | np.ndarray) -> np.ndarray:
    """Scores from released noisy sums restricted to the canary block.

    Args:
        released: [steps, m] (one row per released aggregate) or [m] (already summed):
            coordinate i is the canary-i coordinate of the released noisy sum.

    Returns:
        float64 [m]: the sum over steps.
    """
    x = (
        released.detach().cpu().numpy()
        if isinstance(released, Tensor)
        else np.asarray(released)
    )
    if x.ndim == 1:
        return x.astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"released must be [steps, m] or [m], got shape {x.shape}")
    return x.astype(np.float64).sum(axis=0)


def audit_released(
    released: Tensor | np.ndarray,
    included: np.ndarray,
    *,
    claimed_epsilon: float,
    delta: float,
    k_plus: int,
    k_minus: int,
    alpha: float = 0.05,
) -> AuditResult:
    """Audit a mechanism from its released canary-block sums.

    Args:
        released: [steps, m] or [m] canary coordinates of the released noisy aggregates.
        included: [m] bool inclusion of each canary (from ``draw_inclusion``).
        claimed_epsilon: ε the run's accountant reports.
        delta: δ of the claim.
        k_plus: "in" guesses.
        k_minus: "out" guesses.
        alpha: significance level.

    Returns:
        ``AuditResult``; ``flagged`` means the claim is refuted at level α.
    """
    scores = canary_scores(released)
    r, v = guess_counts(scores, included, k_plus=k_plus, k_minus=k_minus)
    lb = epsilon_lower_bound_from_counts(
        num_canaries=len(scores), guesses=r, correct=v, delta=delta, alpha=alpha
    )
    return AuditResult(
        lb, float(claimed_epsilon), lb > claimed_epsilon, len(scores), r, v
    )


def simulate_gaussian_sum(
    *,
    included: np.ndarray,
    clip_norm: float,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    generator: torch.Generator,
    canary_norm: float | None = None,
    fault: Fault | None = None,
    noise_scale: float = 0.1,
) -> Tensor:
    """Canary coordinates of T released sums of a DP-SGD-style Gaussian sum mechanism.

    Per step, every included canary is Poisson-sampled with rate q; a sampled canary i
    adds its clipped contribution ``min(c, C)·e_i`` (c = ``canary_norm``); the sum gets
    ``N(0, σ²C² I)``. Noise is on the sum (Abadi et al. 2016; ALGORITHMS.md §4.1).

    Faults (the accountant is still told the configured σ and q):
        ``"noise_off"``: σ = 0. ``"noise_scaled"``: σ·``noise_scale``.
        ``"clipping_off"``: contributions are not clipped (``canary_norm`` defaults to 10C).
        ``"sample_every_step"``: canaries are in every step (q = 1).

    Args:
        included: [m] bool inclusion.
        clip_norm: C > 0.
        noise_multiplier: σ ≥ 0.
        sampling_rate: q ∈ (0, 1].
        steps: T ≥ 1.
        generator: torch generator for sampling and noise.
        canary_norm: norm c of a canary's contribution before clipping; default C (10C
            for ``"clipping_off"``).
        fault: one of ``FAULTS`` or ``None``.
        noise_scale: noise factor of the ``"noise_scaled"`` fault.

    Returns:
        float64 tensor [T, m].
    """
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"fault must be None or one of {FAULTS}, got {fault!r}")
    if fault == "noise_scaled" and not noise_scale >= 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    if canary_norm is None:
        canary_norm = 10.0 * clip_norm if fault == "clipping_off" else clip_norm
    if canary_norm < 0:
        raise ValueError(f"canary_norm must be >= 0, got {canary_norm}")

    sigma = noise_multiplier
    if fault == "noise_off":
        sigma = 0.0
    elif fault == "noise_scaled":
        sigma = noise_multiplier * noise_scale
    q = 1.0 if fault == "sample_every_step" else sampling_rate
    contribution = (
        canary_norm if fault == "clipping_off" else min(canary_norm, clip_norm)
    )

    inc = torch.as_tensor(np.asarray(included, dtype=bool))
    m = inc.shape[0]
    sampled = (
        torch.rand(steps, m, generator=generator, dtype=torch.float64) < q
    )  # [T, m]
    signal = (sampled & inc[None, :]).to(torch.float64) * contribution
    noise = torch.randn(steps, m, generator=generator, dtype=torch.float64)
    return signal + (sigma * clip_norm) * noise


def audit_gaussian_sum(
    *,
    clip_norm: float,
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    generator: torch.Generator,
    num_canaries: int = 1000,
    k_plus: int | None = None,
    k_minus: int | None = None,
    alpha: float = 0.05,
    fault: Fault | None = None,
    noise_scale: float = 0.1,
    canary_norm: float | None = None,
    accountant: AccountantName = "rdp",
) -> AuditResult:
    """Audit the idealised subsampled Gaussian sum mechanism, optionally with a fault.

    The claimed ε is what ``accountant`` reports for (σ, q, T, δ) as configured, so a
    fault that changes the real mechanism without changing the accounting should be
    flagged, and the correct mechanism should not (probability ≤ α).

    Args:
        clip_norm: C.
        noise_multiplier: σ.
        sampling_rate: q.
        steps: T.
        delta: δ.
        generator: torch generator (inclusion, sampling and noise).
        num_canaries: m.
        k_plus: "in" guesses; default m/5.
        k_minus: "out" guesses; default m/5 (r = 0.4m as in PRIVACY.md's runs).
        alpha: significance level.
        fault: see ``simulate_gaussian_sum``.
        noise_scale: see ``simulate_gaussian_sum``.
        canary_norm: see ``simulate_gaussian_sum``.
        accountant: accountant of the claim ("rdp", "prv" or "pld").

    Returns:
        ``AuditResult``.
    """
    kp = num_canaries // 5 if k_plus is None else k_plus
    km = num_canaries // 5 if k_minus is None else k_minus
    claimed = epsilon(
        sampling_rate=sampling_rate,
        steps=steps,
        noise_multiplier=noise_multiplier,
        delta=delta,
        accountant=accountant,
    )
    included = draw_inclusion(num_canaries, generator)
    released = simulate_gaussian_sum(
        included=included,
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        sampling_rate=sampling_rate,
        steps=steps,
        generator=generator,
        canary_norm=canary_norm,
        fault=fault,
        noise_scale=noise_scale,
    )
    return audit_released(
        released,
        included,
        claimed_epsilon=claimed,
        delta=delta,
        k_plus=kp,
        k_minus=km,
        alpha=alpha,
    )
