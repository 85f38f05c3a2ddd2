"""Attacks: ALGORITHMS.md §5.2 worked examples, numpy statistics, invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_scenario
from pydantic import ValidationError

from fedflat.attacks import (
    alie_z,
    attack_deltas,
    attack_step,
    byzantine_ids,
    flip_labels,
    round_alie_z,
)
from fedflat.rng import numpy_rng, stream
from fedflat.scenario.aggregation import AggregationConfig
from fedflat.scenario.attack import (
    ALIE_Z_GRID,
    IPM_EPSILON_GRID,
    AttackConfig,
    check_attack,
)
from fedflat.server.pipeline import Pipeline, ServerRound, ServerStep
from fedflat.server.rules import rule_step

F64 = torch.float64


@pytest.mark.parametrize(
    ("n", "f", "epfml", "paper"),
    [(25, 5, 0.253, 0.468), (25, 11, 1.068, 1.405), (50, 12, 0.336, 0.583)],
)
def test_alie_z_worked_examples(n: int, f: int, epfml: float, paper: float) -> None:
    assert alie_z(n, f, "epfml") == pytest.approx(epfml, abs=1e-3)
    assert alie_z(n, f, "paper") == pytest.approx(paper, abs=1e-3)


def test_alie_z_undefined_cases() -> None:
    with pytest.raises(ValueError, match="0 < f < n"):
        alie_z(10, 0)
    with pytest.raises(ValueError, match="undefined"):
        alie_z(10, 6)  # s = 0: the Byzantines are already a majority
    with pytest.raises(ValueError, match="'epfml' or 'paper'"):
        alie_z(10, 2, "fixed")
    # In a round with a Byzantine majority the attack uses the largest defined f.
    assert round_alie_z(10, 7, {}) == pytest.approx(alie_z(10, 5))
    assert round_alie_z(10, 7, {"z_rule": "fixed", "z": 2.5}) == 2.5


def _honest_byz(h: int, b: int, d: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = numpy_rng(0, "eval", key)
    return torch.from_numpy(rng.normal(size=(h, d))), torch.from_numpy(
        rng.normal(size=(b, d))
    )


def test_alie_is_mu_minus_z_sigma() -> None:
    honest, byz = _honest_byz(20, 5, 30, 1)
    out = attack_deltas("alie", honest, byz, n_total=25, params={})  # epfml z
    h = honest.numpy()
    expected = h.mean(0) - 0.2533471031357998 * h.std(0, ddof=1)
    for row in out.numpy():
        np.testing.assert_allclose(row, expected, rtol=1e-12)


def test_ipm_is_minus_epsilon_honest_mean() -> None:
    honest, byz = _honest_byz(11, 3, 12, 2)
    out = attack_deltas("ipm", honest, byz, n_total=14, params={"epsilon": 0.1})
    expected = -0.1 * honest.numpy().mean(0)
    np.testing.assert_allclose(out.numpy(), np.tile(expected, (3, 1)), rtol=1e-12)


def test_sign_flip_scaling_and_passive_kinds() -> None:
    honest, byz = _honest_byz(4, 2, 5, 3)
    torch.testing.assert_close(
        attack_deltas("sign_flip", honest, byz, n_total=6, params={}), -byz
    )
    torch.testing.assert_close(
        attack_deltas("scaling", honest, byz, n_total=6, params={"scale": 7.0}),
        7.0 * byz,
    )
    for kind in ("none", "label_flip"):
        torch.testing.assert_close(
            attack_deltas(kind, honest, byz, n_total=6, params={}), byz
        )
    with pytest.raises(ValueError, match="unknown attack kind"):
        attack_deltas("empire", honest, byz, n_total=6, params={})
    with pytest.raises(ValueError, match="n_total"):
        attack_deltas("ipm", honest, byz, n_total=5, params={})


def test_flip_labels() -> None:
    y = torch.arange(10)
    assert flip_labels(y, 10).tolist() == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    torch.testing.assert_close(flip_labels(flip_labels(y, 10), 10), y)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        flip_labels(y, 5)


def test_byzantine_ids() -> None:
    ids = byzantine_ids(25, 0.2, None, stream(0, "attack"))
    assert len(ids) == 5
    assert all(0 <= i < 25 for i in ids)
    assert byzantine_ids(25, 0.2, None, stream(0, "attack")) == ids  # same stream
    assert byzantine_ids(100, 0.29, None, numpy_rng(0, "attack")).__len__() == 29
    assert byzantine_ids(10, 0.0, None, None) == frozenset()
    assert byzantine_ids(10, 0.0, [3, 7], None) == frozenset({3, 7})
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        byzantine_ids(10, 0.0, [3, 10], None)
    with pytest.raises(ValueError, match="Generator"):
        byzantine_ids(10, 0.5, None, None)
    # Different streams choose different sets (overwhelmingly likely for 5 of 25).
    others = {byzantine_ids(25, 0.2, None, stream(s, "attack")) for s in range(5)}
    assert len(others) > 1


def test_attack_config_validation() -> None:
    cfg = AttackConfig()
    assert (cfg.kind, cfg.z_rule, cfg.epsilon) == ("none", "epfml", 0.1)
    for field in AttackConfig.model_fields.values():
        assert field.description
    with pytest.raises(ValidationError, match="extra"):
        AttackConfig(kind="ipm", fraction=0.2, eps=0.1)
    with pytest.raises(ValidationError, match="not both"):
        AttackConfig(kind="ipm", fraction=0.2, ids=[1])
    with pytest.raises(ValidationError, match="no client is Byzantine"):
        AttackConfig(kind="alie")
    assert check_attack(AttackConfig(kind="alie", ids=[1, 30]), 25) is not None
    assert "attack.fraction" in (
        check_attack(AttackConfig(kind="alie", fraction=0.01), 25) or ""
    )
    assert check_attack(AttackConfig(kind="alie", fraction=0.2), 25) is None


def _sgd() -> ServerStep:
    def apply(rnd: ServerRound, state: tuple, gen: torch.Generator):
        return rnd.with_(new_params=rnd.params + rnd.aggregate), state, {}

    return ServerStep(name="sgd", init=lambda p: (), apply=apply)


def _round(deltas: torch.Tensor, ids: list[int]) -> ServerRound:
    return ServerRound(
        round=0,
        params=torch.zeros(deltas.shape[1], dtype=deltas.dtype),
        deltas=deltas,
        weights=torch.ones(deltas.shape[0], dtype=deltas.dtype),
        client_ids=ids,
        num_clients=40,
    )


def test_attack_step_replaces_only_byzantine_rows_by_client_id() -> None:
    rng = numpy_rng(0, "eval", 5)
    x = torch.from_numpy(rng.normal(size=(6, 4)))
    x0 = x.clone()
    ids = [30, 2, 17, 5, 11, 8]
    step = attack_step(
        frozenset({17, 8, 39}), AttackConfig(kind="sign_flip", ids=[17, 8, 39])
    )
    rnd, _, m = step.apply(_round(x, ids), step.init(x[0]), stream(0, "server", 0))
    assert m["attack/num_byzantine"] == 2.0
    expected = x.clone()
    expected[[2, 5]] *= -1
    torch.testing.assert_close(rnd.deltas, expected)
    assert torch.equal(x, x0)  # the round's input is not mutated


def test_attack_step_composes_with_rules() -> None:
    # 20 honest clients near c and 5 ALIE / IPM(eps=100) attackers; the pipeline
    # attack -> rule -> sgd runs for every rule, and the mean is pulled far by IPM(100).
    rng = numpy_rng(0, "eval", 6)
    c = rng.normal(size=8)
    x = torch.from_numpy(c + 0.1 * rng.normal(size=(25, 8)))
    ids = list(range(25))
    byz = frozenset(range(20, 25))
    honest_mean = x[:20].mean(0)
    ipm = AttackConfig(kind="ipm", ids=sorted(byz), epsilon=100.0)
    for rule, params, far in [
        ("mean", {}, True),
        ("median", {}, False),
        ("krum", {"num_byzantine": 5}, False),
    ]:
        pipe = Pipeline(
            [attack_step(byz, ipm), rule_step(rule, params, "uniform"), _sgd()]
        )
        rnd, _, m = pipe.apply(_round(x, ids), pipe.init(x[0]), stream(0, "server", 0))
        dist = float(torch.linalg.vector_norm(rnd.aggregate - honest_mean))
        assert (dist > 10.0) == far, (rule, dist)
        assert m["attack/num_byzantine"] == 5.0
    alie = AttackConfig(kind="alie", ids=sorted(byz))
    pipe = Pipeline(
        [attack_step(byz, alie), rule_step("median", {}, "uniform"), _sgd()]
    )
    rnd, _, m = pipe.apply(_round(x, ids), pipe.init(x[0]), stream(0, "server", 0))
    assert m["attack/alie_z"] == pytest.approx(0.253, abs=1e-3)
    # Independent numpy recomputation: 5 rows of mu - z sigma (z of n=25, f=5) replace
    # the Byzantine rows, then the coordinate-wise median.
    h = x[:20].numpy()
    sent = h.mean(0) - 0.2533471031357998 * h.std(0, ddof=1)
    expected = np.median(np.vstack([h, np.tile(sent, (5, 1))]), axis=0)
    np.testing.assert_allclose(rnd.aggregate.numpy(), expected, rtol=1e-12)


def test_attack_step_ignores_nan_honest_rows_and_label_flip_is_client_side() -> None:
    x = torch.ones(5, 3, dtype=F64)
    x[0, 1] = float("nan")
    step = attack_step(frozenset({4}), AttackConfig(kind="ipm", ids=[4]))
    rnd, _, _ = step.apply(_round(x, [0, 1, 2, 3, 4]), (), stream(0, "server", 0))
    torch.testing.assert_close(rnd.deltas[4], torch.full((3,), -0.1, dtype=F64))
    lf = attack_step(frozenset({4}), AttackConfig(kind="label_flip", ids=[4]))
    rnd, _, m = lf.apply(_round(x, [0, 1, 2, 3, 4]), (), stream(0, "server", 0))
    assert rnd.deltas is x
    assert m["attack/num_byzantine"] == 1.0


# -------------------- optimised ALIE / IPM, Mimic, inf, Gaussian


def _median_damage(h: np.ndarray, sent: np.ndarray, b: int) -> float:
    """||median([honest; b copies of sent]) - mean(honest)||, in numpy."""
    agg = np.median(np.vstack([h, np.tile(sent, (b, 1))]), axis=0)
    return float(np.linalg.norm(agg - h.mean(0)))


@pytest.mark.parametrize("kind", ["alie", "ipm"])
def test_optimised_factor_is_at_least_as_damaging_as_the_default(kind: str) -> None:
    # 20 honest rows, 5 Byzantine of 25, coordinate-wise median. The damage of every
    # grid factor is recomputed here with numpy; the attack must pick the argmax, and
    # on this case it is strictly more damaging than the default (z = 0.253 / eps = 0.1;
    # for IPM the honest mean is small, so that -0.1 * mean lies amid the honest values
    # and a larger epsilon still moves the median).
    rng = numpy_rng(0, "eval", 7)
    x = torch.from_numpy((1.0 if kind == "alie" else 0.3) + rng.normal(size=(25, 6)))
    h = x[:20].numpy()
    byz = frozenset(range(20, 25))
    cfg = AttackConfig(kind=kind, ids=sorted(byz), optimize=True)
    agg = AggregationConfig(rule="median", weighting="uniform")
    step = attack_step(byz, cfg, aggregation=agg, seed=0)
    rnd, _, m = step.apply(_round(x, list(range(25))), step.init(x[0]), stream(0, "server", 0))

    def sent(v: float) -> np.ndarray:
        if kind == "alie":
            return h.mean(0) - v * h.std(0, ddof=1)
        return -v * h.mean(0)

    default = 0.2533471031357998 if kind == "alie" else 0.1
    grid = ALIE_Z_GRID if kind == "alie" else IPM_EPSILON_GRID
    damages = {v: _median_damage(h, sent(v), 5) for v in (default, *grid)}
    best = max(damages, key=lambda v: damages[v])
    chosen = m["attack/alie_z" if kind == "alie" else "attack/ipm_epsilon"]
    assert damages[chosen] == pytest.approx(damages[best], rel=1e-12)
    assert m["attack/damage"] == pytest.approx(damages[chosen], rel=1e-9)
    assert damages[chosen] > 1.2 * damages[default]
    np.testing.assert_allclose(rnd.deltas[20:].numpy(), np.tile(sent(chosen), (5, 1)))
    np.testing.assert_allclose(rnd.deltas[:20].numpy(), h)


def test_optimised_attack_simulates_pre_aggregation_and_keeps_default_on_ties() -> None:
    # Mean rule: the damage of IPM grows with epsilon, so the largest grid value wins.
    # With pre [nnm] and f = 5 the search still runs through the pre-aggregator.
    rng = numpy_rng(0, "eval", 8)
    x = torch.from_numpy(1.0 + 0.1 * rng.normal(size=(10, 4)))
    byz = frozenset({8, 9})
    cfg = AttackConfig(kind="ipm", ids=[8, 9], optimize=True, factor_grid=[0.5, 3.0])
    step = attack_step(byz, cfg, aggregation=AggregationConfig(weighting="uniform"))
    _, _, m = step.apply(_round(x, list(range(10))), step.init(x[0]), stream(0, "server", 0))
    assert m["attack/ipm_epsilon"] == 3.0
    h = x[:8].numpy()
    want = np.linalg.norm(np.vstack([h, np.tile(-3.0 * h.mean(0), (2, 1))]).mean(0) - h.mean(0))
    assert m["attack/damage"] == pytest.approx(want, rel=1e-12)
    # Identical honest rows and ALIE: sigma = 0, every z sends the same row; the default
    # z is kept (ties never move away from it).
    same = torch.ones(10, 4, dtype=F64)
    alie = AttackConfig(kind="alie", ids=[8, 9], optimize=True)
    nnm = AggregationConfig(rule="median", pre=["nnm"], num_byzantine=2)
    step = attack_step(byz, alie, aggregation=nnm)
    _, _, m = step.apply(_round(same, list(range(10))), step.init(same[0]),
                         stream(0, "server", 0))
    assert m["attack/alie_z"] == pytest.approx(round_alie_z(10, 2, alie.model_dump()))
    with pytest.raises(ValueError, match="aggregation"):
        attack_step(byz, alie)


def test_mimic_copies_the_extreme_client_along_the_main_direction_then_stays() -> None:
    # Honest deltas spread along e_1 (values -3, -1, 1, 3), tiny elsewhere: the
    # direction learned is +-e_1, so the target is client 0 or client 3 (the extremes).
    base = np.array([[-3.0, 0.0, 0.01], [-1.0, 0.02, 0.0], [1.0, 0.0, -0.01], [3.0, 0.01, 0.0]])
    x = torch.from_numpy(np.vstack([base, np.zeros((2, 3))]))
    ids = [0, 1, 2, 3, 4, 5]
    cfg = AttackConfig(kind="mimic", ids=[4, 5], mimic_warmup=1)
    step = attack_step(frozenset({4, 5}), cfg, seed=0)
    rnd, st, m = step.apply(_round(x, ids), step.init(x[0]), stream(0, "server", 0))
    target = int(m["attack/mimic_target"])
    assert target in (0, 3)
    torch.testing.assert_close(rnd.deltas[4:], x[[target, target]])
    # After the warm-up the target is fixed, even when another client is now extreme.
    x2 = x.clone()
    x2[3 - target] *= 10.0
    rnd2, _, m2 = step.apply(_round(x2, ids), st, stream(0, "server", 1))
    assert int(m2["attack/mimic_target"]) == target
    torch.testing.assert_close(rnd2.deltas[4], x2[target])
    # An absent target: that round copies a participating honest client.
    _, _, m3 = step.apply(_round(x2[1:], ids[1:]), st, stream(0, "server", 2))
    assert int(m3["attack/mimic_target"]) in (1, 2, 3)


def test_inf_attack_is_dropped_or_gives_finite_robust_aggregates() -> None:
    rng = numpy_rng(0, "eval", 9)
    x = torch.from_numpy(rng.normal(size=(11, 5))).to(torch.float32)
    ids = list(range(11))
    byz = frozenset({8, 9, 10})
    h = x[:8].to(F64)
    radius = float(torch.linalg.vector_norm(h - h.mean(0), dim=1).max())
    # inf: the server drops the rows; every rule aggregates the honest rows only.
    step = attack_step(byz, AttackConfig(kind="inf", ids=sorted(byz)))
    for rule, params in [("mean", {}), ("median", {}), ("krum", {"num_byzantine": 2})]:
        pipe = Pipeline([step, rule_step(rule, params, "uniform"), _sgd()])
        rnd, _, m = pipe.apply(_round(x, ids), pipe.init(x[0]), stream(0, "server", 0))
        assert m["agg/num_rejected"] == 3.0
        assert bool(torch.isfinite(rnd.aggregate).all())
    # A huge finite value reaches the rules: robust ones stay near the honest rows, the
    # mean overflows float32 and says so.
    huge = attack_step(byz, AttackConfig(kind="inf", ids=sorted(byz), inf_value=3e38))
    for rule, params in [("median", {}), ("krum", {"num_byzantine": 3}),
                         # tol 0: RFA's relative-objective stop would end the
                         # iterations early (finite, but ~1e31 away) on 3e38 inputs.
                         ("geometric_median", {"tol": 0.0}), ("caf", {"num_byzantine": 3}),
                         ("trimmed_mean", {"trim_ratio": 0.3})]:
        pipe = Pipeline([huge, rule_step(rule, params, "uniform"), _sgd()])
        rnd, _, _ = pipe.apply(_round(x, ids), pipe.init(x[0]), stream(0, "server", 0))
        assert float(torch.linalg.vector_norm(rnd.aggregate.to(F64) - h.mean(0))) <= radius
    pipe = Pipeline([huge, rule_step("mean", {}, "uniform"), _sgd()])
    with pytest.raises(ValueError, match="non-finite aggregate"):
        pipe.apply(_round(x, ids), pipe.init(x[0]), stream(0, "server", 0))


def test_gaussian_attack_moments_and_seeded_stream() -> None:
    x = torch.zeros(6, 20_000, dtype=F64)
    cfg = AttackConfig(kind="gaussian", ids=[4, 5], gauss_mu=2.0, gauss_sigma=3.0)
    step = attack_step(frozenset({4, 5}), cfg, seed=1)
    rnd, _, _ = step.apply(_round(x, list(range(6))), (), stream(0, "server", 0))
    rows = rnd.deltas[4:].numpy()
    n = rows.size
    assert abs(rows.mean() - 2.0) < 5 * 3.0 / np.sqrt(n)
    assert abs(rows.std() - 3.0) < 5 * 3.0 / np.sqrt(2 * n)
    assert not np.array_equal(rows[0], rows[1])  # one draw per client
    again, _, _ = step.apply(_round(x, list(range(6))), (), stream(0, "server", 0))
    assert torch.equal(again.deltas, rnd.deltas)  # the attack stream, not the server's


def test_new_attack_config_checks() -> None:
    with pytest.raises(ValidationError, match="optimize applies"):
        AttackConfig(kind="sign_flip", ids=[1], optimize=True)
    with pytest.raises(ValidationError, match="factor_grid"):
        AttackConfig(kind="ipm", ids=[1], optimize=True, factor_grid=[-1.0])
    assert AttackConfig(kind="inf", ids=[1]).inf_value == float("inf")


@pytest.mark.slow
@pytest.mark.parametrize(
    "over",
    [
        {"attack.kind": "mimic", "attack.mimic_warmup": 2},
        {"attack.kind": "alie", "attack.optimize": True, "attack.factor_grid": [1.0, 3.0],
         "server.aggregation.rule": "centered_clipping"},
        {"attack.kind": "gaussian", "server.aggregation.rule": "caf",
         "server.aggregation.num_byzantine": 1},
    ],
    ids=["mimic", "alie_opt_cclip", "gaussian_caf"],
)
def test_stateful_attacks_resume_exactly(tmp_path: Path, over: dict) -> None:
    # The attack state (Mimic's direction and target, the optimised attack's simulated
    # centered-clipping state) goes into checkpoints: resumed == uninterrupted.
    import fedflat

    sc = tiny_scenario(**{"server.rounds": 4, "output.keep_checkpoints": 10,
                          "attack.ids": [0, 1, 2, 3, 4, 5], **over})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    for p in (again.run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > 2:
            p.unlink()
    (again.run_dir / "final_model.pt").unlink()
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    attacked = [m for m in reference.metrics if m.get("attack/num_byzantine", 0) > 0]
    assert attacked  # the Byzantine clients took part
