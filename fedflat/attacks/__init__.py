"""Byzantine clients: sign flip, label flip, scaling, ALIE, IPM (fixed or optimised),
Mimic, inf, Gaussian (ALGORITHMS.md §5.2)."""

from fedflat.attacks.byzantine import (
    ATTACKS,
    alie_z,
    attack_deltas,
    attack_step,
    byzantine_ids,
    default_factor,
    factor_grid,
    flip_labels,
    round_alie_z,
)
from fedflat.attacks.mimic import mimic_init, mimic_target
from fedflat.attacks.search import line_search

__all__ = [
    "ATTACKS",
    "alie_z",
    "attack_deltas",
    "attack_step",
    "byzantine_ids",
    "default_factor",
    "factor_grid",
    "flip_labels",
    "line_search",
    "mimic_init",
    "mimic_target",
    "round_alie_z",
]
