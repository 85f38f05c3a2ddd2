"""Shared fixtures: one Ray instance for the whole session, small scenarios, data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("FEDFLAT_DATA") or str(REPO.parent / "shared" / "data")


def data_available(*parts: str) -> bool:
    return Path(DATA_DIR, *parts).exists()


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once per test process (one per xdist worker) and shut it down after its
    last test."""
    ray = pytest.importorskip("ray")
    started = False
    if not ray.is_initialized():
        from fedflat.runtime.backends import RAY_SYSTEM_CONFIG

        # As the Ray backend does: Ray's accelerator FutureWarning then stays out of the log.
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, _system_config=RAY_SYSTEM_CONFIG)
        started = True
    yield ray
    if started:
        ray.shutdown()


def set_keys(sc: dict, over: dict) -> dict:
    """Set dotted keys (``{"client.lr": 0.1}``) in a scenario dict, in place; returns it."""
    for key, value in over.items():
        node = sc
        *path, leaf = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return sc


def tiny_scenario(**over) -> dict:
    """A small synthetic scenario as a dict; ``over`` maps dotted keys to values."""
    sc = {
        "name": "tiny",
        "seed": 3,
        "data": {"dataset": "synthetic", "num_clients": 12,
                 "synthetic": {"alpha": 1.0, "beta": 1.0, "max_size": 120}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 10, "local_epochs": 1},
        "server": {"rounds": 4, "clients_per_round": 4},
        "runtime": {"threads": 1},
        "eval": {"every": 2},
        "output": {"checkpoint_every": 1},
    }
    return set_keys(sc, over)
