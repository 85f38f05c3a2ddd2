"""Byzantine clients: sign flip, label flip, scaling, ALIE, IPM (ALGORITHMS.md §5.2)."""

from fedflat.attacks.byzantine import (
    ATTACKS,
    alie_z,
    attack_step,
    attack_updates,
    byzantine_ids,
    flip_labels,
    round_alie_z,
)

__all__ = [
    "ATTACKS",
    "alie_z",
    "attack_step",
    "attack_updates",
    "byzantine_ids",
    "flip_labels",
    "round_alie_z",
]
