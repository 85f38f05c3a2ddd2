"""Cohort sampling: which clients take part in round t (a pure function of seed and t)."""

from __future__ import annotations

import numpy as np

from fedflat.rng import numpy_rng


def sample_cohort(
    seed: int, round_: int, num_clients: int, *, method: str, clients_per_round: int,
    sampling_rate: float | None = None, eligible: np.ndarray | None = None,
) -> list[int]:
    """Client ids for round ``round_``, sorted.

    Args:
        method: "uniform" (exactly ``clients_per_round`` without replacement, fewer if fewer
            are eligible) or "poisson" (each eligible client independently with rate q; the
            cohort may be empty and is never resampled, as DP accounting assumes).
        sampling_rate: Poisson rate q; default clients_per_round / num_clients.
        eligible: optional boolean mask of available clients.
    """
    rng = numpy_rng(seed, "sample", round_)
    ids = np.arange(num_clients) if eligible is None else np.flatnonzero(eligible)
    if method == "poisson":
        q = sampling_rate if sampling_rate is not None else clients_per_round / num_clients
        draws = rng.random(num_clients)  # one draw per client id, whatever is eligible
        chosen = ids[draws[ids] < q]
    elif method == "uniform":
        m = min(clients_per_round, len(ids))
        chosen = rng.choice(ids, size=m, replace=False) if m else ids[:0]
    else:
        raise ValueError(f"unknown sampling method {method!r}")
    return sorted(int(c) for c in chosen)
