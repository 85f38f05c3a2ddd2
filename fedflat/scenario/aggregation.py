"""Scenario schema of the server's aggregation rule (``server.aggregation``).

One config class per rule, chosen by ``rule``, so a YAML block reads::

    server:
      aggregation:
        rule: krum
        num_byzantine: 5
        bucket_size: 2

A key of another rule is an error naming it; ``rule_params()`` returns the rule's keys
under the same names that ``fedflat.server.rules.apply_rule`` takes.
Definitions and defaults follow ALGORITHMS.md §5.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from fedflat.scenario.variants import VariantConfig, family, family_of

# MDA enumerates the C(n, f) subsets of n - f inputs (cost C(n, f) * (n - f)^2 after the
# O(n^2 d) distance matrix); configurations with more subsets than this are refused.
# 100 000 subsets take about a second; C(25, 5) = 53 130 fits, C(30, 6) = 593 775 not.
MAX_SUBSETS = 100_000
# SMEA solves one symmetric eigenvalue problem of size m = n - f per subset, O(m^3):
# its limit is on C(n, f) * (n - f)^3 (20 000 subsets of 20 inputs, about a second on
# one core at ~40-80 us each). C(25, 4) * 21^3 = 1.2e8 fits, C(25, 5) * 20^3 = 4.3e8
# not; at n = 100 only f = 1 fits (100 * 99^3 = 9.7e7).
SMEA_MAX_WORK = 160_000_000


@dataclass(frozen=True)
class RuleSpec:
    """What the server knows of one rule, read off its config class.

    ``params``: the ``server.aggregation`` keys the rule reads (besides ``pre`` and
    ``bucket_size``, which wrap any rule). ``n_condition``: (factor, offset) when the
    rule needs n >= factor * f + offset inputs (rows, or buckets with bucketing).
    ``subset_limit``: (limit, power) when the rule enumerates the C(n, f) subsets of
    n - f inputs; it refuses configurations with C(n, f) * (n - f)^power > limit
    (power 0: a limit on the number of subsets). None: not combinatorial.
    """

    params: tuple[str, ...]
    n_condition: tuple[int, int] | None = None
    subset_limit: tuple[int, int] | None = None

    def subset_work(self, n: int, f: int) -> int:
        """C(n, f) * (n - f)^power, the quantity ``subset_limit`` bounds."""
        power = 0 if self.subset_limit is None else self.subset_limit[1]
        return math.comb(n, f) * (n - f) ** power

    def too_many_subsets(self, n: int, f: int) -> bool:
        return self.subset_limit is not None and self.subset_work(n, f) > self.subset_limit[0]


PreName = Literal["nnm", "arc", "clip", "bucketing"]
PRE_NEEDS_NUM_BYZANTINE = ("nnm", "arc")

_KEY = "server.aggregation"


class AggregationConfig(VariantConfig):
    """``server.aggregation``: the rule that turns the client deltas into one.

    One config class per rule (fedflat.scenario.variants), chosen by ``rule``; the keys
    of this base (weighting, the pre-aggregators, bucketing) wrap every rule, a rule adds
    its own. A rule's condition on n and its subset limit are class attributes of its
    config: ``RULE_SPECS`` is read off them. ``AggregationConfig(**block)`` returns the
    variant.
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)
    n_condition: ClassVar[tuple[int, int] | None] = None
    subset_limit: ClassVar[tuple[int, int] | None] = None

    rule: str
    weighting: Literal["samples", "uniform"] = Field(
        default="samples",
        description=(
            "Client weights the rule uses: 'samples' = number of local training "
            "samples n_i (weighted mean / weighted median / RFA alpha_i ∝ n_i), "
            "'uniform' = every client counts once. Krum's selection ignores weights."
        ),
    )
    num_byzantine: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Assumed number f of Byzantine inputs per aggregation (count, not "
            "fraction); required by krum, multi_krum, bulyan, mda, monna, meamed, "
            "caf, smea and the pre-aggregators nnm and arc, refused elsewhere. With "
            "bucketing it stays f while n becomes the number of buckets (as in the "
            "reference code)."
        ),
    )
    pre: list[PreName] = Field(
        default_factory=list,
        description=(
            "Pre-aggregators applied in order before the rule: nnm (each input -> mean "
            "of its n - f nearest neighbours, Allouah et al. 2023), arc (clip every "
            "input to the norm of the floor(2(f/n)(n-f))+1-th largest, Allouah et al. "
            "2024), clip (clip every input to clip_norm), bucketing (bucket means of "
            "bucket_size). nnm and arc need num_byzantine."
        ),
    )
    clip_norm: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "pre 'clip': L2 norm every input is clipped to (units of the deltas); "
            "required when pre lists clip."
        ),
    )
    bucket_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Bucketing (Karimireddy, He, Jaggi 2022): randomly permute the deltas, "
            "average buckets of at most bucket_size, and apply the rule to the bucket "
            "means. null = off; 2 in the paper. Required when pre lists bucketing; "
            "set without listing bucketing in pre, it appends bucketing at the end of "
            "pre (the key's meaning before pre existed)."
        ),
    )

    @model_validator(mode="after")
    def _pre_needs(self) -> AggregationConfig:
        pre_f = [q for q in self.pre if q in PRE_NEEDS_NUM_BYZANTINE]
        if pre_f and self.num_byzantine is None:
            raise ValueError(
                f"num_byzantine is required when pre lists {pre_f} "
                "(the assumed number of Byzantine inputs f)"
            )
        if not pre_f and self.num_byzantine is not None and "num_byzantine" not in (
                RULE_SPECS[self.rule].params):
            raise ValueError(
                f"num_byzantine applies to rules {', '.join(NEEDS_NUM_BYZANTINE)} and the "
                f"pre-aggregators {', '.join(PRE_NEEDS_NUM_BYZANTINE)}, not to rule "
                f"{self.rule!r}"
            )
        if "clip" in self.pre and self.clip_norm is None:
            raise ValueError("clip_norm is required when pre lists clip")
        if "bucketing" in self.pre and self.bucket_size is None:
            raise ValueError("bucket_size is required when pre lists bucketing")
        return self

    def rule_params(self) -> dict[str, Any]:
        """The rule's parameters, ``pre`` and the pre-aggregators' (for ``apply_rule``)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in RULE_SPECS[self.rule].params}
        out["bucket_size"] = self.bucket_size
        if self.pre:
            out["pre"] = list(self.pre)
            if "clip" in self.pre:
                out["clip_norm"] = self.clip_norm
            if any(q in PRE_NEEDS_NUM_BYZANTINE for q in self.pre):
                out["num_byzantine"] = self.num_byzantine
        return out


class MeanRule(AggregationConfig):
    rule: Literal["mean"] = Field("mean", description="mean (weighted)")


class MedianRule(AggregationConfig):
    rule: Literal["median"] = Field("median", description="median (coordinate-wise)")


class TrimmedMeanRule(AggregationConfig):
    rule: Literal["trimmed_mean"] = Field(
        "trimmed_mean", description="trimmed_mean (coordinate-wise, Yin et al. 2018)")
    trim_ratio: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description=(
            "Fraction beta in [0, 0.5); per coordinate the floor(beta*n) largest and "
            "floor(beta*n) smallest values are dropped (Yin et al. 2018)."
        ),
    )


_F = ("Assumed number f of Byzantine inputs per aggregation (count), required; with "
      "bucketing it stays f while n becomes the number of buckets.")


class _ByzantineRule(AggregationConfig):
    """A rule that needs f and n >= 2f + 1 inputs unless it says otherwise."""

    n_condition: ClassVar[tuple[int, int] | None] = (2, 1)
    num_byzantine: int = Field(..., ge=0, description=_F)


class _KrumFamily(_ByzantineRule):
    n_condition: ClassVar[tuple[int, int] | None] = (2, 3)
    krum_variant: Literal["paper", "epfml"] = Field(
        default="paper",
        description=(
            "'paper' = Blanchard et al. 2017 (scores sum squared distances, Multi-Krum "
            "averages the m selected); 'epfml' = the epfml reference code (scores sum "
            "squared squared distances, Multi-Krum sums the m selected), to reproduce its "
            "tables (ALGORITHMS.md §5.1)."
        ),
    )


class KrumRule(_KrumFamily):
    rule: Literal["krum"] = Field("krum", description="krum (n >= 2f + 3)")


class MultiKrumRule(_KrumFamily):
    rule: Literal["multi_krum"] = Field("multi_krum", description="multi_krum (n >= 2f + 3)")
    num_selected: int | None = Field(
        default=None,
        ge=1,
        description="Number m of lowest-score inputs averaged (count). Default n - f; "
        "m = 1 is Krum.",
    )


class BulyanRule(_ByzantineRule):
    n_condition: ClassVar[tuple[int, int] | None] = (4, 3)
    rule: Literal["bulyan"] = Field("bulyan", description="bulyan (n >= 4f + 3)")


class GeometricMedianRule(AggregationConfig):
    rule: Literal["geometric_median"] = Field(
        "geometric_median", description="geometric_median (RFA, smoothed Weiszfeld)")
    nu: float = Field(
        default=1e-5,
        gt=0.0,
        description=(
            "Smoothing nu of the Weiszfeld weights alpha_i / max(nu, ||z - x_i||), in "
            "the units of the deltas (RFA official: 1e-5)."
        ),
    )
    max_iters: int = Field(
        default=100,
        ge=1,
        description=(
            "Cap on the Weiszfeld iterations; they stop earlier once the relative "
            "objective change is below tol (the iterations used are logged as "
            "agg/gm_iters). 100 lets the iterations converge; 4 is RFA's official budget "
            "(krishnap25/RFA), which under attack can stop far from the geometric median."
        ),
    )
    tol: float = Field(
        default=1e-6,
        ge=0.0,
        description=(
            "Stop when the objective sum_i alpha_i ||z - x_i|| decreases by less than "
            "tol times its value (relative; RFA official: 1e-6)."
        ),
    )
    init: Literal["mean", "zero"] = Field(
        default="mean",
        description="Starting point, the weighted mean (RFA official) or the zero vector "
        "(epfml variant).",
    )
    max_update_norm: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "RFA's server guard; an aggregate whose L2 norm exceeds this (units of the "
            "deltas) is discarded, the round changes nothing and agg/gm_rejected = 1 is "
            "logged. null = off; 1000 in RFA's constants."
        ),
    )


class CenteredClippingRule(AggregationConfig):
    rule: Literal["centered_clipping"] = Field(
        "centered_clipping", description="centered_clipping (around the previous aggregate)")
    tau: float = Field(
        default=10.0,
        gt=0.0,
        description=(
            "Clipping radius tau around the previous aggregate, in the units of the "
            "deltas (L2 norm). 10 in the bucketing paper, 100 in the CC paper's CIFAR-10 "
            "runs; .inf disables clipping."
        ),
    )
    iters: int = Field(
        default=3,
        ge=1,
        description="Clipping iterations L per aggregation (3 in the bucketing paper, 1 "
        "in the CC paper's CIFAR-10 runs).",
    )


class MdaRule(_ByzantineRule):
    subset_limit: ClassVar[tuple[int, int] | None] = (MAX_SUBSETS, 0)
    rule: Literal["mda"] = Field("mda", description="mda (minimum-diameter averaging)")


class MonnaRule(_ByzantineRule):
    rule: Literal["monna"] = Field("monna", description="monna (trusted-input neighbours)")
    trusted_index: int = Field(
        default=0,
        ge=0,
        description=(
            "Row (after NaN/Inf rows are dropped, in the round's client order) of the "
            "input the server trusts; the rule averages its n - f nearest neighbours "
            "(itself included)."
        ),
    )


class MeamedRule(_ByzantineRule):
    rule: Literal["meamed"] = Field("meamed", description="meamed (mean around the median)")


class CafRule(_ByzantineRule):
    rule: Literal["caf"] = Field("caf", description="caf (covariance-bound agnostic filter)")


class SmeaRule(_ByzantineRule):
    subset_limit: ClassVar[tuple[int, int] | None] = (SMEA_MAX_WORK, 3)
    rule: Literal["smea"] = Field(
        "smea", description="smea (smallest maximum eigenvalue averaging)")


AggregationSpec = family(
    AggregationConfig, label="rule", tag="rule", default="mean",
    variants=(MeanRule, MedianRule, TrimmedMeanRule, KrumRule, MultiKrumRule, BulyanRule,
              GeometricMedianRule, CenteredClippingRule, MdaRule, MonnaRule, MeamedRule,
              CafRule, SmeaRule),
)
RULE_CONFIGS: dict[str, type[AggregationConfig]] = family_of(AggregationConfig).variants  # type: ignore[assignment]


def _spec(cls: type[AggregationConfig]) -> RuleSpec:
    shared = AggregationConfig.model_fields
    params = tuple(k for k, f in cls.model_fields.items()
                   if k != "rule" and (k not in shared or f.is_required()))
    return RuleSpec(params, cls.n_condition, cls.subset_limit)


# The one table of rule names, their parameters and their conditions on n, read off the
# config classes. The schema (check_aggregation) and the server (fedflat.server.rules)
# both read it.
RULE_SPECS: dict[str, RuleSpec] = {name: _spec(cls) for name, cls in RULE_CONFIGS.items()}

RuleName = Literal[tuple(RULE_SPECS)]  # type: ignore[valid-type]

# Views of RULE_SPECS under the names the rest of the code reads.
RULE_PARAMETERS: dict[str, tuple[str, ...]] = {k: s.params for k, s in RULE_SPECS.items()}
N_CONDITIONS: dict[str, tuple[int, int]] = {
    k: s.n_condition for k, s in RULE_SPECS.items() if s.n_condition is not None
}
NEEDS_NUM_BYZANTINE: tuple[str, ...] = tuple(
    k for k, s in RULE_SPECS.items() if "num_byzantine" in s.params
)


def num_rule_inputs(clients_per_round: int, bucket_size: int | None) -> int:
    """Number of vectors the rule sees: the clients, or the buckets when bucketing."""
    if bucket_size is None:
        return clients_per_round
    return math.ceil(clients_per_round / bucket_size)


def check_aggregation(cfg: AggregationConfig, clients_per_round: int) -> str | None:
    """Check that the rule's condition on the number of inputs n can hold.

    The conditions come from ``RULE_SPECS`` (e.g. Krum and Multi-Krum n >= 2f + 3, Bulyan
    n >= 4f + 3, ALGORITHMS.md §5.1; MDA, MoNNA, Meamed, CAF, SMEA n >= 2f + 1); with
    bucketing n is the number of buckets ceil(clients_per_round / bucket_size).
    Multi-Krum also needs num_selected <= n; MDA and SMEA must stay within their subset
    limits.

    Args:
        cfg: the aggregation block.
        clients_per_round: number of client deltas the server receives each round.

    Returns:
        An error message naming the offending key, or None if the configuration can
        work.
    """
    n = num_rule_inputs(clients_per_round, cfg.bucket_size)
    where = (
        f"{clients_per_round} clients per round"
        if cfg.bucket_size is None
        else f"{n} buckets ({clients_per_round} clients per round, bucket_size "
        f"{cfg.bucket_size})"
    )
    f = cfg.num_byzantine
    if cfg.rule in NEEDS_NUM_BYZANTINE:
        if f is None:  # the model validator prevents this; kept for mutated configs
            return f"{_KEY}.num_byzantine is required when rule is {cfg.rule!r}"
        factor, offset = N_CONDITIONS[cfg.rule]
        if n < factor * f + offset:
            return (
                f"{_KEY}.num_byzantine: rule {cfg.rule!r} needs n >= {factor}f+{offset} "
                f"inputs per aggregation, i.e. n >= {factor * f + offset} for "
                f"num_byzantine={f}, but the server gets n = {where}; "
                + (
                    f"lower num_byzantine to at most {(n - offset) // factor} or "
                    if n >= offset
                    else ""
                )
                + "raise clients_per_round"
                + ("" if cfg.bucket_size is None else " or lower bucket_size")
            )
        if (
            cfg.rule == "multi_krum"
            and cfg.num_selected is not None
            and cfg.num_selected > n
        ):
            return (
                f"{_KEY}.num_selected: multi_krum averages "
                f"num_selected={cfg.num_selected} inputs but the server gets only "
                f"n = {where}"
            )
        if RULE_SPECS[cfg.rule].too_many_subsets(n, f):
            return subset_limit_message(cfg.rule, n, f, where)
    return None


def subset_limit_message(rule: str, n: int, f: int, where: str | None = None) -> str:
    """The refusal of a combinatorial rule (mda, smea) with too many subsets."""
    spec = RULE_SPECS[rule]
    assert spec.subset_limit is not None  # noqa: S101 - only called for such rules
    limit, power = spec.subset_limit
    what = (
        ""
        if power == 0
        else f" C(n, f) * (n - f)^{power} = {math.comb(n, f)} * {n - f}^{power} ="
    )
    return (
        f"{_KEY}.num_byzantine: rule {rule!r} enumerates the C(n, f) subsets of n - f "
        f"inputs; n={n}, f={f} gives{what} {spec.subset_work(n, f)} > {limit} (the limit)"
        + ("" if where is None else f"; the server gets n = {where}")
        + "; lower num_byzantine or clients_per_round"
    )
