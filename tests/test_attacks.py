"""Attacks: ALGORITHMS.md §5.2 worked examples, numpy statistics, invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedflat.attacks import (
    alie_z,
    attack_step,
    attack_updates,
    byzantine_ids,
    flip_labels,
    round_alie_z,
)
from fedflat.rng import numpy_rng, stream
from fedflat.scenario.attack import AttackConfig, check_attack
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
    out = attack_updates("alie", honest, byz, n_total=25, params={})  # epfml z
    h = honest.numpy()
    expected = h.mean(0) - 0.2533471031357998 * h.std(0, ddof=1)
    for row in out.numpy():
        np.testing.assert_allclose(row, expected, rtol=1e-12)


def test_ipm_is_minus_epsilon_honest_mean() -> None:
    honest, byz = _honest_byz(11, 3, 12, 2)
    out = attack_updates("ipm", honest, byz, n_total=14, params={"epsilon": 0.1})
    expected = -0.1 * honest.numpy().mean(0)
    np.testing.assert_allclose(out.numpy(), np.tile(expected, (3, 1)), rtol=1e-12)


def test_sign_flip_scaling_and_passive_kinds() -> None:
    honest, byz = _honest_byz(4, 2, 5, 3)
    torch.testing.assert_close(
        attack_updates("sign_flip", honest, byz, n_total=6, params={}), -byz
    )
    torch.testing.assert_close(
        attack_updates("scaling", honest, byz, n_total=6, params={"scale": 7.0}),
        7.0 * byz,
    )
    for kind in ("none", "label_flip"):
        torch.testing.assert_close(
            attack_updates(kind, honest, byz, n_total=6, params={}), byz
        )
    with pytest.raises(ValueError, match="unknown attack kind"):
        attack_updates("empire", honest, byz, n_total=6, params={})
    with pytest.raises(ValueError, match="n_total"):
        attack_updates("ipm", honest, byz, n_total=5, params={})


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
