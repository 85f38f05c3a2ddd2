"""Differential-privacy accounting, noise calibration and empirical auditing.

``epsilon`` / ``noise_multiplier`` answer "ε for σ" and "σ for ε" for the
Poisson-subsampled Gaussian mechanism with Opacus (RDP, PRV) or dp-accounting (PLD);
``Accountant`` keeps a run's ledger; ``audit`` holds the one-run audit of Steinke, Nasr,
Jagielski (2023). See /work/shared/PRIVACY.md for what the numbers mean and their pitfalls.
"""

from fedflat.privacy.accountant import Accountant, epsilons, max_epsilon
from fedflat.privacy.accounting import (
    DEFAULT_RDP_ORDERS,
    Calibration,
    EpsilonResult,
    adaptive_clip_noise_split,
    calibrate,
    clear_memory_cache,
    compute_epsilon,
    epsilon,
    noise_multiplier,
    rdp_epsilon_floor,
)
from fedflat.privacy.audit import (
    AuditResult,
    audit_gaussian_sum,
    audit_released,
    canary_scores,
    draw_inclusion,
    epsilon_lower_bound,
    epsilon_lower_bound_from_counts,
    epsilon_lower_bound_multi,
    simulate_gaussian_sum,
)

__all__ = [
    "DEFAULT_RDP_ORDERS",
    "Accountant",
    "AuditResult",
    "Calibration",
    "EpsilonResult",
    "adaptive_clip_noise_split",
    "audit_gaussian_sum",
    "audit_released",
    "calibrate",
    "canary_scores",
    "clear_memory_cache",
    "compute_epsilon",
    "draw_inclusion",
    "epsilon",
    "epsilon_lower_bound",
    "epsilon_lower_bound_from_counts",
    "epsilon_lower_bound_multi",
    "epsilons",
    "max_epsilon",
    "noise_multiplier",
    "rdp_epsilon_floor",
    "simulate_gaussian_sum",
]
