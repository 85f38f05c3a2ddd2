"""The line search of the optimised ALIE and IPM attacks.

Each round the attackers try every factor of a documented grid (``ALIE_Z_GRID``,
``IPM_EPSILON_GRID`` in ``fedflat.scenario.attack``, or ``attack.factor_grid``) plus the
round's default factor, simulate what the server's aggregation (rule, pre-aggregators,
weighting, NaN/Inf filter) makes of the round's deltas with each, and send the one whose
aggregate lies farthest (L2) from the honest mean. The grid search is exhaustive, so
unlike the expanding/contracting search of LPD-EPFL/byzfl ``LineMaximize`` its result
never depends on where the search starts; the default factor is evaluated first and
kept on ties, so the optimised attack is never less damaging than the default one on
the simulated aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def line_search(
    evaluate: Callable[[float], float], grid: Sequence[float], default: float
) -> tuple[float, float]:
    """The factor of largest ``evaluate`` among ``default`` and ``grid``.

    Args:
        evaluate: factor -> damage (a float; NaN counts as no damage).
        grid: factors to try, in order.
        default: tried first; wins every tie.

    Returns:
        (best factor, its damage).
    """
    best, best_val = float(default), _val(evaluate(float(default)))
    for v in grid:
        val = _val(evaluate(float(v)))
        if val > best_val:
            best, best_val = float(v), val
    return best, best_val


def _val(x: float) -> float:
    return -math.inf if math.isnan(x) else float(x)


__all__ = ["line_search"]
