"""fedflat: federated optimisation with flat-minimum methods, privacy and bandwidth limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedflat._version import __version__

if TYPE_CHECKING:
    from fedflat.runtime.run import RunResult


def run(source: Any, overrides: Any = None, out: Any = None) -> RunResult:
    """Run a scenario (path, dict or Scenario); see ``fedflat.runtime.run.run``."""
    from fedflat.runtime.run import run as _run

    return _run(source, overrides, out)


def resume(run_dir: Any) -> RunResult:
    """Resume a run folder from its newest checkpoint."""
    from fedflat.runtime.run import resume as _resume

    return _resume(run_dir)


def aggregate(
    deltas: Any,
    rule: str = "mean",
    weights: Any = None,
    *,
    pre: Any = (),
    seed: int = 0,
    **params: Any,
) -> Any:
    """Aggregate [n, d] deltas (tensor or numpy array / array-like) with a named rule,
    after the ordered pre-aggregators ``pre``; returns a [d] tensor. ``seed`` seeds
    bucketing's permutation unless ``gen=`` is given. See ``fedflat.server.rules.aggregate``.
    """
    from fedflat.server.rules import aggregate as _aggregate

    return _aggregate(deltas, rule=rule, weights=weights, pre=pre, seed=seed, **params)


__all__ = ["__version__", "aggregate", "resume", "run"]
