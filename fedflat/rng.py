"""Seeded random streams.

Every random draw in fedflat comes from a generator derived from the run seed and a
path such as ("client", round, client_id). Results therefore do not depend on the
backend, the worker that runs a client, the order of execution or retries: a worker
receives the integer path and builds the same generator the serial reference builds.
"""

from __future__ import annotations

import numpy as np
import torch

# Stable ids for random purposes. Never renumber: checkpoints and results depend on them.
PURPOSES: dict[str, int] = {
    "init": 0,  # model initialisation
    "sample": 1,  # cohort sampling per round
    "client": 2,  # batches and local randomness of one client update
    "noise": 3,  # central DP noise
    "data": 4,  # dataset generation (synthetic data)
    "partition": 5,  # partitioners
    "system": 6,  # device speed, availability, dropout
    "attack": 7,  # adversaries
    "codec": 8,  # stochastic codecs
    "eval": 9,  # evaluation subsets, sharpness probes
    "audit": 10,  # privacy audit canaries
    "server": 11,  # server-side randomness (bucketing permutations, ...)
    "split": 12,  # train/test splits
    "client_noise": 13,  # user-level DP noise a client adds to its own delta (DP-FedSAM)
    "topology": 14,  # decentralized graphs (Erdős–Rényi draws, random matchings)
}


def seed_sequence(seed: int, purpose: str, *ids: int) -> np.random.SeedSequence:
    """Return the SeedSequence for ``(seed, purpose, *ids)``."""
    try:
        pid = PURPOSES[purpose]
    except KeyError:
        raise ValueError(
            f"unknown random purpose {purpose!r}; known: {sorted(PURPOSES)}"
        ) from None
    return np.random.SeedSequence(int(seed), spawn_key=(pid, *(int(i) for i in ids)))


def numpy_rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    """A numpy Generator for one purpose (never the global numpy state)."""
    return np.random.default_rng(seed_sequence(seed, purpose, *ids))


def stream(
    seed: int, purpose: str, *ids: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A torch Generator for one purpose (never the global torch state)."""
    state = seed_sequence(seed, purpose, *ids).generate_state(1, np.uint64)[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state))
    return gen
