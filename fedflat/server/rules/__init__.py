"""Aggregation rules over a stacked ``[n, d]`` delta matrix (ALGORITHMS.md §5.1).

Where things are:

* ``common``: input checks, the NaN/Inf row filter (``sanitize``), the mean, the
  float64 pairwise distances, the rules' conditions on n (``min_inputs``).
* ``coordinate``: coordinate-wise rules (median, trimmed mean, Meamed).
* ``distance``: rules on the pairwise distances (Krum, Multi-Krum, Bulyan, MDA, MoNNA,
  SMEA) and NNM mixing.
* ``iterative``: geometric median (Weiszfeld), centered clipping, CAF.
* ``pre``: the pre-aggregators (NNM, ARC, static clipping, bucketing) and their order.
* ``registry``: rule names (from ``fedflat.scenario.aggregation.RULE_SPECS``, the one
  table of names, parameters and n-conditions), parameter checks, ``apply_rule``,
  ``aggregate`` and the server step ``rule_step``.

Every rule is vectorised over the coordinates: per-coordinate statistics use one sort
along the client axis, distances come from one Gram matrix. Python loops run only over
iterations (Weiszfeld, centered clipping, Bulyan's n - 2f Krum rounds), over subsets
(MDA, SMEA) and over large column blocks that bound temporary memory on the CPU, never over
single coordinates.

Rules never draw random numbers themselves; bucketing permutes the inputs with the
``torch.Generator`` it is handed. Centered clipping keeps its previous output in the
rule state (``{"v": tensor}``); the other rules are stateless.

Two entry points:

* ``apply_rule(deltas, weights, rule=..., params=..., state=..., gen=...)`` returns the
  aggregate, the new state and metrics; ``rule_step(...)`` wraps it as a server step.
* ``aggregate(deltas, rule="median", **params)`` is the one-call convenience.

Parameter names are those of the scenario block ``server.aggregation``
(``fedflat.scenario.aggregation.AggregationConfig``), with the same defaults. Names
with a leading underscore are shared between the modules of this package only.
"""

from fedflat.server.rules.common import mean, min_inputs, pairwise_sq_dists, sanitize
from fedflat.server.rules.coordinate import meamed, median, trimmed_mean
from fedflat.server.rules.distance import (
    KRUM_VARIANTS,
    bulyan,
    bulyan_select,
    krum,
    krum_scores,
    krum_select,
    mda,
    mda_select,
    monna,
    multi_krum,
    nnm,
    smea,
    smea_select,
)
from fedflat.server.rules.iterative import caf, caf_weights, centered_clipping, geometric_median
from fedflat.server.rules.pre import arc, arc_num_clipped, bucket_means, clip
from fedflat.server.rules.registry import (
    PRE_AGGREGATORS,
    RULES,
    WEIGHTINGS,
    aggregate,
    apply_rule,
    resolve_params,
    rule_step,
)

__all__ = [
    "KRUM_VARIANTS",
    "PRE_AGGREGATORS",
    "RULES",
    "WEIGHTINGS",
    "aggregate",
    "apply_rule",
    "arc",
    "arc_num_clipped",
    "bucket_means",
    "bulyan",
    "bulyan_select",
    "caf",
    "caf_weights",
    "centered_clipping",
    "clip",
    "geometric_median",
    "krum",
    "krum_scores",
    "krum_select",
    "mda",
    "mda_select",
    "meamed",
    "mean",
    "median",
    "min_inputs",
    "monna",
    "multi_krum",
    "nnm",
    "pairwise_sq_dists",
    "resolve_params",
    "rule_step",
    "sanitize",
    "smea",
    "smea_select",
    "trimmed_mean",
]
