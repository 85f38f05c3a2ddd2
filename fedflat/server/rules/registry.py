"""The registry: rule names, parameter checks, dispatch, ``apply_rule`` and ``rule_step``.

Rule names, their parameters and their conditions on n come from one table,
``fedflat.scenario.aggregation.RULE_SPECS`` (the scenario schema reads it too); this
module maps each name to its function (``_DISPATCH``, checked against the table at
import) and holds the parameter checks.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from fedflat.rng import stream
from fedflat.scenario.aggregation import (
    NEEDS_NUM_BYZANTINE,
    PRE_NEEDS_NUM_BYZANTINE,
    RULE_PARAMETERS,
    AggregationConfig,
    PreName,
    num_rule_inputs,
)
from fedflat.server.pipeline import Metrics, ServerRound, ServerStep
from fedflat.server.rules.common import (
    RuleState,
    check_deltas,
    check_weights,
    mean,
    min_inputs,
    normalized_weights,
    sanitize,
    weighted_mean,
)
from fedflat.server.rules.coordinate import meamed, median, trimmed_mean
from fedflat.server.rules.distance import (
    bulyan,
    krum_select,
    mda,
    monna,
    multi_krum,
    smea_select,
)
from fedflat.server.rules.iterative import (
    caf_with_stats,
    checked_center,
    clip_iterations,
    weiszfeld,
)
from fedflat.server.rules.pre import apply_pre

RULES: tuple[str, ...] = tuple(RULE_PARAMETERS)
WEIGHTINGS: tuple[str, ...] = ("samples", "uniform")
PRE_AGGREGATORS: tuple[str, ...] = typing.get_args(PreName)


def resolve_params(rule: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a rule's parameters and fill in the scenario defaults.

    Args:
        rule: one of ``RULES``.
        params: the rule's parameters (names as in ``server.aggregation``) and
            optionally ``bucket_size``. Parameters of other rules are refused.

    Returns:
        A new dict with every parameter of the rule plus ``bucket_size`` and ``pre``
        (the ordered pre-aggregators; ``bucket_size`` alone appends bucketing).

    Raises:
        ValueError: unknown rule, unknown parameter, missing ``num_byzantine`` or a
            value out of range (the message names the parameter, the bound and the
            value).
    """
    if rule not in RULE_PARAMETERS:
        raise ValueError(f"unknown aggregation rule {rule!r}; known: {list(RULES)}")
    pre = list(params.get("pre") or [])
    bad_pre = [q for q in pre if q not in PRE_AGGREGATORS]
    if bad_pre:
        raise ValueError(
            f"unknown pre-aggregators {bad_pre}; known: {list(PRE_AGGREGATORS)}"
        )
    allowed = (*RULE_PARAMETERS[rule], "bucket_size", "pre")
    if "clip" in pre:
        allowed = (*allowed, "clip_norm")
    needs_f = rule in NEEDS_NUM_BYZANTINE or any(
        q in PRE_NEEDS_NUM_BYZANTINE for q in pre
    )
    if needs_f and "num_byzantine" not in allowed:
        allowed = (*allowed, "num_byzantine")
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(
            f"rule {rule!r} takes parameters {list(allowed)}, got unknown {unknown}"
        )
    try:  # the bounds and conditions are the rule config's (fedflat.scenario.aggregation)
        cfg = AggregationConfig.model_validate({"rule": rule, **params, "pre": pre})
    except ValidationError as exc:
        raise ValueError(_plain(exc)) from None
    p = {k: getattr(cfg, k) for k in allowed if k != "pre"}
    if p["bucket_size"] is not None and "bucketing" not in pre:
        pre.append("bucketing")  # the bucket_size key alone: bucketing right before the rule
    p["pre"] = pre
    return p


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="),
           "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _plain(exc: ValidationError) -> str:
    """A config error as the functions' callers read it: ``trim_ratio must be < 0.5, got 0.5``."""
    out = []
    for e in exc.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] in _BOUNDS:
            bound, sign = _BOUNDS[e["type"]]
            out.append(f"{key} must be {sign} {e['ctx'][bound]}, got {e['input']!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            out.append(f"{key}: {msg}" if key else msg)
    return "; ".join(out)


# -------------------- dispatch

_RuleOut = tuple[Tensor, RuleState, Metrics]
_RuleFn = Callable[[Tensor, Tensor | None, dict[str, Any], RuleState], _RuleOut]


def _r_mean(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return mean(x, w), dict(st), {}


def _r_median(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    return median(x, w), dict(st), {}


def _r_trimmed(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    b = math.floor(p["trim_ratio"] * x.shape[0] + 1e-9)
    agg = trimmed_mean(x, w, trim_ratio=p["trim_ratio"])
    return agg, dict(st), {"agg/num_trimmed": float(b)}


def _r_krum(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    idx = int(
        krum_select(x, num_byzantine=p["num_byzantine"], variant=p["krum_variant"])[0]
    )
    return x[idx].clone(), dict(st), {"agg/selected_index": float(idx)}


def _r_multi_krum(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    f = p["num_byzantine"]
    m = x.shape[0] - f if p["num_selected"] is None else p["num_selected"]
    agg = multi_krum(x, w, num_byzantine=f, num_selected=m, variant=p["krum_variant"])
    return agg, dict(st), {"agg/num_selected": float(m)}


def _r_bulyan(
    x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState
) -> _RuleOut:
    f = p["num_byzantine"]
    agg = bulyan(x, w, num_byzantine=f)
    theta = x.shape[0] - 2 * f
    return (
        agg,
        dict(st),
        {"agg/num_selected": float(theta), "agg/num_averaged": float(theta - 2 * f)},
    )


def _r_gm(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    z, iters, obj = weiszfeld(
        x,
        normalized_weights(w, x.shape[0], x),
        nu=p["nu"],
        max_iters=p["max_iters"],
        tol=p["tol"],
        init=p["init"],
    )
    m = {"agg/gm_iters": float(iters), "agg/gm_objective": obj}
    cap = p["max_update_norm"]
    if cap is not None:
        # RFA's server guard (krishnap25/RFA models/server.py, MAX_UPDATE_NORM = 1000):
        # an aggregate that is too long is discarded and the round changes nothing.
        rejected = float(torch.linalg.vector_norm(z.to(torch.float64))) > cap
        m["agg/gm_rejected"] = float(rejected)
        if rejected:
            z = torch.zeros_like(z)
    return z, dict(st), m


def _r_cc(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    v0 = checked_center(st.get("v"), x)
    v, frac = clip_iterations(
        x, normalized_weights(w, x.shape[0], x), v0, tau=p["tau"], iters=p["iters"]
    )
    shift = float(torch.linalg.vector_norm((v - v0).to(torch.float64)))
    new_state = {**st, "v": v.clone()}
    return v, new_state, {"agg/cc_frac_clipped": frac, "agg/cc_shift": shift}


def _r_mda(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return mda(x, w, num_byzantine=p["num_byzantine"]), dict(st), {}


def _r_monna(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    agg = monna(
        x, w, num_byzantine=p["num_byzantine"], trusted_index=p["trusted_index"]
    )
    return agg, dict(st), {}


def _r_meamed(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    return meamed(x, w, num_byzantine=p["num_byzantine"]), dict(st), {}


def _r_caf(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    agg, lam, iters = caf_with_stats(x, w, num_byzantine=p["num_byzantine"])
    return agg, dict(st), {"agg/caf_iters": float(iters), "agg/caf_lambda": lam}


def _r_smea(x: Tensor, w: Tensor | None, p: dict[str, Any], st: RuleState) -> _RuleOut:
    sel, lam = smea_select(x, num_byzantine=p["num_byzantine"])
    agg = weighted_mean(x[sel], None if w is None else w.to(x.device)[sel])
    return agg, dict(st), {"agg/smea_lambda": lam}


_DISPATCH: dict[str, _RuleFn] = {
    "mean": _r_mean,
    "median": _r_median,
    "trimmed_mean": _r_trimmed,
    "krum": _r_krum,
    "multi_krum": _r_multi_krum,
    "bulyan": _r_bulyan,
    "geometric_median": _r_gm,
    "centered_clipping": _r_cc,
    "mda": _r_mda,
    "monna": _r_monna,
    "meamed": _r_meamed,
    "caf": _r_caf,
    "smea": _r_smea,
}
if set(_DISPATCH) != set(RULE_PARAMETERS):  # one table of names: fail at import, not later
    raise ImportError(
        f"rules without a function or a spec: {sorted(set(_DISPATCH) ^ set(RULE_PARAMETERS))}"
    )


def apply_rule(
    deltas: Tensor,
    weights: Tensor | None,
    *,
    rule: str,
    params: Mapping[str, Any],
    state: Mapping[str, Tensor] | None,
    gen: torch.Generator | None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, float]]:
    """Aggregate a stacked delta matrix with a named rule.

    Args:
        deltas: [n, d] deltas (already sanitised: every entry finite).
        weights: optional [n] non-negative weights (None = uniform).
        rule: one of ``RULES``.
        params: the rule's parameters (``server.aggregation`` names; missing ones take
            the scenario defaults) and optionally ``bucket_size`` to wrap the rule in
            bucketing.
        state: the rule state returned by the previous call (``{}`` or None at first).
        gen: generator for bucketing's permutation (unused otherwise).

    Returns:
        (aggregate [d], new state, metrics). Metrics: ``agg/num_buckets`` (bucketing),
        ``agg/selected_index`` (krum; an index into the rows, or into the buckets),
        ``agg/num_selected``, ``agg/num_averaged``, ``agg/num_trimmed``,
        ``agg/gm_iters``, ``agg/gm_objective``, ``agg/cc_frac_clipped``,
        ``agg/cc_shift``, ``agg/gm_rejected`` (geometric_median with max_update_norm),
        ``agg/caf_iters``, ``agg/caf_lambda``, ``agg/smea_lambda``; the
        pre-aggregators' (``pre.apply_pre``).

    Raises:
        ValueError: bad rule/parameters/inputs, too few inputs for the rule's
            condition (``RULE_SPECS``; n = number of buckets with bucketing), too many
            subsets for mda/smea, or a non-finite aggregate from finite inputs (huge
            inputs overflowing a non-robust rule such as the mean).
    """
    p = resolve_params(rule, params)
    x = check_deltas(deltas)
    w = check_weights(weights, x.shape[0])
    x, w, metrics = apply_pre(x, w, p, gen)
    agg, new_state, m = _DISPATCH[rule](x, w, p, dict(state or {}))
    if not bool(torch.isfinite(agg).all()) and bool(torch.isfinite(x).all()):
        # Finite inputs, non-finite output: huge inputs overflowed a non-robust sum.
        raise ValueError(
            f"rule {rule!r} returned a non-finite aggregate from finite inputs (largest "
            f"|entry| {float(x.abs().max()):.3g} in {x.dtype}): the inputs overflow; use "
            "a robust rule or a pre-aggregator that bounds them (arc, clip)"
        )
    metrics.update(m)
    return agg, new_state, metrics


def aggregate(
    deltas: Any,
    rule: str = "median",
    weights: Any = None,
    *,
    pre: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    gen: torch.Generator | None = None,
    state: Mapping[str, Tensor] | None = None,
    **params: Any,
) -> Tensor:
    """One-call aggregation: ``aggregate(x, "krum", pre=["nnm"], num_byzantine=2)``.

    Args:
        deltas: [n, d] deltas: a tensor, or a numpy array / nested list (converted
            with ``torch.as_tensor``; integers become float64).
        rule: one of ``RULES``.
        weights: optional [n] non-negative weights (tensor or array-like).
        pre: pre-aggregators applied in order (``PRE_AGGREGATORS``).
        seed: seeds the generator of bucketing's permutation when ``gen`` is None
            (``fedflat.rng.stream(seed, "server", 0)``), so calls are reproducible.
        gen: an explicit generator (overrides ``seed``).
        state: rule state (centered clipping's previous output ``{"v": ...}``).
        **params: the rule's parameters, named as in ``server.aggregation``.

    Returns:
        [d] aggregate (a tensor).
    """
    x = torch.as_tensor(deltas)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    w = None if weights is None else torch.as_tensor(weights)
    if gen is None:
        gen = stream(seed, "server", 0)
    if pre:
        params = {**params, "pre": list(pre)}
    agg, _, _ = apply_rule(x, w, rule=rule, params=params, state=state, gen=gen)
    return agg


# -------------------- server step


def rule_step(
    rule: str, params: Mapping[str, Any], weighting: str = "samples"
) -> ServerStep:
    """Server step that aggregates ``round.deltas`` into ``round.aggregate``.

    Rows with NaN/Inf are dropped first (``sanitize``); the rule then sees the remaining
    rows with weights ``round.weights`` ("samples") or none ("uniform"). The step state
    is the rule state (centered clipping's v, zeros at the start). If every row is
    rejected, or fewer rows (buckets) remain than the rule's condition needs (krum
    n >= 2f+3, bulyan n >= 4f+3), the aggregate is the zero vector (the round changes
    nothing) and ``agg/num_rejected`` / ``agg/skipped`` say so.

    Args:
        rule: one of ``RULES``.
        params: the rule's parameters (``AggregationConfig.rule_params()``).
        weighting: "samples" or "uniform".

    Returns:
        A ``ServerStep`` named ``"aggregate"``. Its metrics: ``agg/num_rejected``,
        ``agg/num_inputs`` plus those of ``apply_rule``; for krum without bucketing also
        ``agg/selected_client`` (the client id).

    Raises:
        ValueError: bad rule, parameters or weighting (at construction).
    """
    resolved = resolve_params(rule, params)
    if weighting not in WEIGHTINGS:
        raise ValueError(
            f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}"
        )

    def init(global_params: Tensor) -> RuleState:
        if rule == "centered_clipping":
            # v_0 = 0 (ALGORITHMS.md §5.1), kept across rounds.
            return {"v": torch.zeros_like(global_params)}
        return {}

    def apply(
        rnd: ServerRound, state: RuleState, gen: torch.Generator
    ) -> tuple[ServerRound, RuleState, Metrics]:
        d = rnd.params.numel()
        mask, num_rejected = sanitize(rnd.deltas, d)
        x = rnd.deltas[mask] if num_rejected else rnd.deltas
        metrics: Metrics = {
            "agg/num_rejected": float(num_rejected),
            "agg/num_inputs": float(x.shape[0]),
        }
        n_eff = num_rule_inputs(
            x.shape[0],
            resolved["bucket_size"] if "bucketing" in resolved["pre"] else None,
        )
        if n_eff < min_inputs(rule, resolved):
            # Poisson sampling, dropouts or rejected rows can leave fewer inputs than the
            # rule's condition: the round changes nothing and says so, the run goes on.
            metrics["agg/skipped"] = 1.0
            agg = torch.zeros(d, dtype=rnd.deltas.dtype, device=rnd.deltas.device)
            return rnd.with_(aggregate=agg), state, metrics
        w = None
        if weighting == "samples":
            w = rnd.weights[mask.to(rnd.weights.device)]
        agg, new_state, m = apply_rule(
            x, w, rule=rule, params=resolved, state=state, gen=gen
        )
        metrics.update(m)
        if "agg/selected_index" in m and "bucketing" not in resolved["pre"]:
            valid_ids = [
                c for c, ok in zip(rnd.client_ids, mask.tolist(), strict=True) if ok
            ]
            metrics["agg/selected_client"] = float(
                valid_ids[int(m["agg/selected_index"])]
            )
        return rnd.with_(aggregate=agg), new_state, metrics


    return ServerStep(name="aggregate", init=init, apply=apply)
