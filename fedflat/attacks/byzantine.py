"""Byzantine clients: who they are and what they send (ALGORITHMS.md §5.2).

The Byzantine set is drawn once per run (``byzantine_ids``). Each round, ``attack_step``
replaces the rows of the Byzantine participants in ``round.deltas`` by what the attack
sends; it runs before sanitising and the aggregation rule, so it composes with every
rule. Label flipping is the one client-side attack: the client trains honestly on
``flip_labels(y)``, and ``attack_step`` leaves its delta as it is.

Random numbers come from the "attack" stream only: the Byzantine set
(``stream(seed, "attack")``), Gaussian rows (ids 1, round), Mimic's initial direction
(id 2) and the bucketing permutation the optimised attacks simulate (ids 3, round).
The optimised ALIE/IPM (``attack.optimize``) search their factor on a grid
(``fedflat.attacks.search``); Mimic's target follows ``fedflat.attacks.mimic``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Collection, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.attacks.mimic import mimic_init, mimic_target
from fedflat.attacks.search import line_search
from fedflat.rng import stream
from fedflat.scenario.aggregation import AggregationConfig
from fedflat.scenario.attack import (
    ALIE_Z_GRID,
    IPM_EPSILON_GRID,
    AttackConfig,
    AttackKind,
)
from fedflat.server.pipeline import Metrics, ServerRound, ServerStep
from fedflat.server.rules import rule_step

ATTACKS: tuple[str, ...] = typing.get_args(AttackKind)
# Attacks that see the honest deltas of the round.
_OMNISCIENT = ("alie", "ipm", "mimic")


def byzantine_ids(
    num_clients: int,
    fraction: float,
    ids: Collection[int] | None,
    gen_or_rng: torch.Generator | np.random.Generator | None,
) -> frozenset[int]:
    """The run's Byzantine clients: the explicit ``ids``, or floor(fraction*N) drawn.

    Args:
        num_clients: population size N >= 1.
        fraction: in [0, 1); ignored when ``ids`` is given.
        ids: explicit client ids, or None.
        gen_or_rng: a torch or numpy generator for the draw (e.g.
            ``fedflat.rng.stream(seed, "attack")``); may be None when ``ids`` is given
            or the count is 0.

    Returns:
        The set of Byzantine client ids.

    Raises:
        ValueError: bad N, fraction or ids, or a draw without a generator.
    """
    if (
        isinstance(num_clients, bool)
        or not isinstance(num_clients, int)
        or num_clients < 1
    ):
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if ids is not None:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < num_clients]
        if bad:
            raise ValueError(f"ids must lie in [0, {num_clients}), got {bad}")
        if len(set(out)) != len(out):
            raise ValueError(f"ids must be distinct, got {out}")
        return frozenset(out)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    # 1e-9 guards floor() against products such as 0.29 * 100 = 28.999999999999996.
    k = math.floor(fraction * num_clients + 1e-9)
    if k == 0:
        return frozenset()
    if isinstance(gen_or_rng, torch.Generator):
        perm = torch.randperm(
            num_clients, generator=gen_or_rng, device=gen_or_rng.device
        )
        return frozenset(int(i) for i in perm[:k].tolist())
    if isinstance(gen_or_rng, np.random.Generator):
        return frozenset(int(i) for i in gen_or_rng.permutation(num_clients)[:k])
    raise ValueError(
        f"drawing {k} Byzantine clients needs a torch.Generator or numpy Generator, "
        f"got {type(gen_or_rng).__name__}"
    )


def flip_labels(y: Tensor, num_classes: int) -> Tensor:
    """Label flipping y -> C - 1 - y (``9 - y`` for 10 classes).

    Args:
        y: integer class labels in [0, C).
        num_classes: C >= 1.

    Returns:
        The flipped labels (a new tensor, same dtype).

    References:
        epfml/byzantine-robust-noniid-optimizer ``codes/attacks/labelflipping.py``.
    """
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    return (num_classes - 1) - y


def alie_z(n: int, f: int, rule: str = "epfml") -> float:
    """The z of "A Little Is Enough" from n inputs of which f are Byzantine.

    With s = floor(n/2 + 1) - f supporters needed: "epfml" (reference code)
    z = Phi^-1((n - f - s) / (n - f)); "paper" z = Phi^-1((n - s) / n). Examples
    (ALGORITHMS.md §5.2): n=25, f=5 -> 0.253 / 0.468.

    Args:
        n: number of inputs to the aggregator.
        f: number of Byzantine inputs, 1 <= f with s >= 1 (f <= floor(n/2)).
        rule: "epfml" or "paper".

    Returns:
        z.

    Raises:
        ValueError: a rule name not known, or (n, f) for which the probability is not in
            (0, 1) (f = 0, or Byzantines already a majority: s <= 0).

    References:
        Baruch, Baruch, Goldberg, "A Little Is Enough: Circumventing Defenses For
        Distributed Learning", NeurIPS 2019; epfml ``codes/attacks/alittle.py``.
    """
    if rule not in ("epfml", "paper"):
        raise ValueError(f"z rule must be 'epfml' or 'paper', got {rule!r}")
    if not 0 < f < n:
        raise ValueError(f"alie needs 0 < f < n, got n={n}, f={f}")
    s = math.floor(n / 2 + 1) - f
    p = (n - f - s) / (n - f) if rule == "epfml" else (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(
            f"alie z is undefined for n={n}, f={f} with the {rule!r} rule "
            f"(s = floor(n/2+1) - f = {s}, probability {p:.4g} not in (0, 1))"
        )
    return NormalDist().inv_cdf(p)


def _param(params: Mapping[str, Any], name: str) -> Any:
    return params.get(name, AttackConfig.model_fields[name].default)


def _reference_rows(honest: Tensor, byzantine: Tensor, need: int) -> Tensor:
    """Rows an omniscient attacker estimates statistics from.

    The honest rows of the round; if fewer than ``need`` exist, the Byzantine clients'
    own honestly computed deltas are pooled in (what a non-omniscient ALIE uses).
    """
    return honest if honest.shape[0] >= need else torch.cat([honest, byzantine], dim=0)


def round_alie_z(n_total: int, num_byz: int, params: Mapping[str, Any]) -> float:
    """The ALIE z of a round with ``num_byz`` Byzantine of ``n_total`` inputs.

    A round in which the Byzantine clients already hold a majority (possible with client
    sampling) has no finite z under the epfml/paper rules; it then uses the z of the
    largest f for which they are defined, f = floor(n/2) (the attackers need no honest
    supporter, so any finite z works). Rounds too small for the rule (n <= 2 with
    "epfml", where z = -inf) use z = 0, i.e. send the honest mean.
    """
    rule = _param(params, "z_rule")
    if rule == "fixed":
        return float(_param(params, "z"))
    f = min(num_byz, n_total // 2)
    if f < 1 or (rule == "epfml" and n_total <= 2):
        return 0.0
    return alie_z(n_total, f, rule)


def attack_deltas(
    kind: str,
    honest: Tensor,
    byzantine: Tensor,
    *,
    n_total: int,
    params: Mapping[str, Any],
    factor: float | None = None,
    target: int | None = None,
    gen: torch.Generator | None = None,
) -> Tensor:
    """What the Byzantine clients of a round send.

    Args:
        kind: one of ``ATTACKS``.
        honest: [h, d] the honest clients' deltas of the round (omniscient attacks).
        byzantine: [b, d] the deltas the Byzantine clients computed honestly.
        n_total: number of inputs the aggregator receives this round (>= h + b).
        params: attack parameters named as in ``AttackConfig`` (``scale``, ``z_rule``,
            ``z``, ``epsilon``, ``inf_value``, ``gauss_mu``, ``gauss_sigma``); missing
            ones take its defaults.
        factor: alie's z or ipm's epsilon, overriding the one ``params`` gives (the
            optimised attacks' choice).
        target: mimic: the row of ``honest`` to copy (``fedflat.attacks.mimic``).
        gen: gaussian: the generator of the rows (required).

    Returns:
        [b, d] the Byzantine rows to send:
        none/label_flip: unchanged; sign_flip: -x_i; scaling: scale * x_i;
        alie: mu - z * sigma (coordinate-wise over the honest rows, unbiased std), the
        same for every Byzantine client; ipm: -epsilon * mean(honest); mimic: the honest
        row ``target``, the same for every Byzantine client; inf: ``inf_value`` in
        every coordinate; gaussian: independent N(gauss_mu, gauss_sigma^2) entries.
        With no (alie: fewer than 2) honest rows, the statistics pool in the Byzantine
        clients' own deltas; mimic with no honest row sends the rows unchanged.

    Raises:
        ValueError: unknown kind, inconsistent shapes, mimic without a valid target,
            gaussian without a generator.

    References:
        Baruch et al., NeurIPS 2019 (ALIE); Xie, Koyejo, Gupta, "Fall of Empires:
        Breaking Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2019 (IPM);
        epfml/byzantine-robust-noniid-optimizer ``codes/attacks``.
    """
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; known: {list(ATTACKS)}")
    if (
        honest.dim() != 2
        or byzantine.dim() != 2
        or honest.shape[1] != byzantine.shape[1]
    ):
        raise ValueError(
            "honest and byzantine must be [h, d] and [b, d], got "
            f"{tuple(honest.shape)} and {tuple(byzantine.shape)}"
        )
    b = byzantine.shape[0]
    if n_total < honest.shape[0] + b:
        raise ValueError(
            f"n_total must be >= h + b = {honest.shape[0] + b}, got {n_total}"
        )
    if b == 0 or kind in ("none", "label_flip"):
        return byzantine.clone()
    if kind == "sign_flip":
        return -byzantine
    if kind == "scaling":
        return float(_param(params, "scale")) * byzantine
    if kind in ("alie", "ipm"):
        if factor is None:
            factor = default_factor(kind, n_total, b, params)
        return _scaled_rows(_moments(kind, honest, byzantine), float(factor), b)
    if kind == "mimic":
        if honest.shape[0] == 0:
            return byzantine.clone()
        if target is None or not 0 <= target < honest.shape[0]:
            raise ValueError(
                f"mimic needs the row of the honest client to copy in [0, "
                f"{honest.shape[0]}), got {target!r}"
            )
        return honest[target].expand(b, -1).clone()
    if kind == "inf":
        return torch.full_like(byzantine, float(_param(params, "inf_value")))
    # gaussian
    if gen is None:
        raise ValueError("the gaussian attack needs a torch.Generator, got None")
    noise = torch.randn(byzantine.shape, generator=gen, dtype=byzantine.dtype,
                        device=gen.device).to(byzantine.device)
    return float(_param(params, "gauss_mu")) + float(_param(params, "gauss_sigma")) * noise


def _moments(kind: str, honest: Tensor, byzantine: Tensor) -> tuple[Tensor, Tensor]:
    """(base, direction) with rows base - factor * direction: ALIE (mu, sigma) over the
    honest rows (unbiased std), IPM (0, mean)."""
    if kind == "alie":
        ref = _reference_rows(honest, byzantine, 2)
        mu = ref.mean(dim=0)
        sigma = (
            ref.std(dim=0, correction=1) if ref.shape[0] >= 2 else torch.zeros_like(mu)
        )
        return mu, sigma
    mean = _reference_rows(honest, byzantine, 1).mean(dim=0)
    return torch.zeros_like(mean), mean


def _scaled_rows(moments: tuple[Tensor, Tensor], factor: float, b: int) -> Tensor:
    base, direction = moments
    return (base - factor * direction).expand(b, -1).clone()


def default_factor(kind: str, n_total: int, num_byz: int, params: Mapping[str, Any]) -> float:
    """The non-optimised factor of a round: ALIE's z (``round_alie_z``), IPM's epsilon."""
    if kind == "alie":
        return round_alie_z(n_total, num_byz, params)
    return float(_param(params, "epsilon"))


def factor_grid(cfg: AttackConfig) -> tuple[float, ...]:
    """The factors the optimised attack tries besides the default."""
    if cfg.factor_grid is not None:
        return tuple(float(v) for v in cfg.factor_grid)
    return ALIE_Z_GRID if cfg.kind == "alie" else IPM_EPSILON_GRID


def attack_step(
    byz: frozenset[int],
    cfg: AttackConfig,
    *,
    aggregation: AggregationConfig | None = None,
    seed: int = 0,
) -> ServerStep:
    """Server step that replaces the Byzantine participants' rows of ``round.deltas``.

    Place it before the aggregation step (``rule_step``), so that sanitising and every
    rule see the attacked matrix. Honest rows with NaN/Inf are ignored by the omniscient
    attacks' statistics.

    Args:
        byz: the run's Byzantine client ids (``byzantine_ids``).
        cfg: the attack block.
        aggregation: the server's aggregation block; required by the optimised attacks
            (``cfg.optimize``), which simulate it (``fedflat.attacks.search``).
        seed: the run's seed (the "attack" stream of gaussian, mimic and the search).

    Returns:
        A ``ServerStep`` named ``"attack"``. Its state is ``()``, except for mimic (the
        heuristic's direction and target, ``fedflat.attacks.mimic``) and the optimised
        attacks (the simulated rule state, e.g. centered clipping's v). Metrics:
        ``attack/num_byzantine`` (Byzantine participants this round); ``attack/alie_z``
        (alie), ``attack/ipm_epsilon`` (optimised ipm), ``attack/damage`` (optimised:
        ||simulated aggregate - honest mean||), ``attack/mimic_target`` (client id).

    Raises:
        ValueError: ``cfg.optimize`` without ``aggregation``.
    """
    byz = frozenset(int(i) for i in byz)
    params = cfg.model_dump()
    sim = None
    if cfg.optimize:
        if aggregation is None:
            raise ValueError(
                f"attack.optimize ({cfg.kind}) simulates the server's aggregation: pass "
                "aggregation="
            )
        sim = rule_step(aggregation.rule, aggregation.rule_params(),
                        weighting=aggregation.weighting)
    grid = factor_grid(cfg) if cfg.optimize else ()

    def init(global_params: Tensor) -> Any:
        if cfg.kind == "mimic":
            return mimic_init()
        if sim is not None:
            return {"sim": sim.init(global_params)}
        return ()

    def apply(
        rnd: ServerRound, state: Any, gen: torch.Generator
    ) -> tuple[ServerRound, Any, Metrics]:
        flags = [cid in byz for cid in rnd.client_ids]
        num_byz = sum(flags)
        metrics: Metrics = {"attack/num_byzantine": float(num_byz)}
        if num_byz == 0 or cfg.kind in ("none", "label_flip"):
            return rnd, state, metrics
        mask = torch.tensor(flags, dtype=torch.bool, device=rnd.deltas.device)
        honest = rnd.deltas[~mask]
        finite = torch.isfinite(honest).all(dim=1)
        honest = honest[finite]
        n_total = rnd.deltas.shape[0]
        kw: dict[str, Any] = {}
        if cfg.kind == "mimic" and honest.shape[0] > 0:
            ids = [c for c, f in zip(rnd.client_ids, flags, strict=True) if not f]
            ids = [c for c, ok in zip(ids, finite.tolist(), strict=True) if ok]
            row, state = mimic_target(honest, ids, state, warmup=cfg.mimic_warmup,
                                      gen=stream(seed, "attack", 2))
            kw["target"] = row
            metrics["attack/mimic_target"] = float(ids[row])
        elif cfg.kind == "gaussian":
            kw["gen"] = stream(seed, "attack", 1, rnd.round)

        moments = None
        if sim is not None:  # the line search: the round's statistics once, not per factor
            moments = _moments(cfg.kind, honest, rnd.deltas[mask])

        def send(factor: float | None) -> Tensor:
            if moments is not None and factor is not None:
                rows = _scaled_rows(moments, factor, num_byz)
            else:
                rows = attack_deltas(cfg.kind, honest, rnd.deltas[mask], n_total=n_total,
                                      params=params, factor=factor, **kw)
            deltas = rnd.deltas.clone()
            deltas[mask] = rows
            return deltas

        if sim is not None and honest.shape[0] > 0:
            honest_mean = honest.to(torch.float64).mean(dim=0)
            sims: dict[float, Any] = {}

            def damage(factor: float) -> float:
                out, st, _ = sim.apply(rnd.with_(deltas=send(factor)), state["sim"],
                                       stream(seed, "attack", 3, rnd.round))
                sims[factor] = st
                assert out.aggregate is not None  # noqa: S101 - the rule step fills it
                diff = out.aggregate.to(torch.float64) - honest_mean
                return float(torch.linalg.vector_norm(diff))

            best, dmg = line_search(
                damage, grid, default_factor(cfg.kind, n_total, num_byz, params)
            )
            state = {**state, "sim": sims[best]}
            metrics["attack/damage"] = dmg
            metrics["attack/alie_z" if cfg.kind == "alie" else "attack/ipm_epsilon"] = best
            return rnd.with_(deltas=send(best)), state, metrics
        if cfg.kind == "alie":
            metrics["attack/alie_z"] = round_alie_z(n_total, num_byz, params)
        return rnd.with_(deltas=send(None)), state, metrics

    return ServerStep(name="attack", init=init, apply=apply)


__all__ = [
    "ATTACKS",
    "alie_z",
    "attack_deltas",
    "attack_step",
    "byzantine_ids",
    "default_factor",
    "factor_grid",
    "flip_labels",
    "round_alie_z",
]
