"""Privacy accounting, calibration, the Accountant ledger, the privacy config and CLI.

Reference values: ALGORITHMS.md §9.1 (TF-Privacy README, DP-SAT notebooks, DP-FedSAM's
eps_computer.py), PRIVACY.md (PLD/PRV vs RDP), and closed forms: the exact (ε, δ) curve of
the Gaussian mechanism (Balle & Wang 2018, Theorem 8) and the RDP of the unsampled
Gaussian, α/(2σ²).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import threading

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import optimize, stats

from fedflat.privacy import (
    Accountant,
    adaptive_clip_noise_split,
    calibrate,
    clear_memory_cache,
    compute_epsilon,
    epsilon,
    epsilons,
    noise_multiplier,
    rdp_epsilon_floor,
)
from fedflat.privacy import accountant as accountant_mod
from fedflat.privacy.cli import add_privacy_parser, register, run_privacy
from fedflat.scenario.privacy import PrivacyConfig

MNIST_Q = 256 / 60000


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir and a cold in-process cache."""
    monkeypatch.setenv("FEDFLAT_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()
    yield
    clear_memory_cache()


def gaussian_exact_epsilon(sigma: float, delta: float) -> float:
    """ε of one Gaussian mechanism (sensitivity 1, std σ) at δ, Balle & Wang 2018 Thm 8."""

    def gap(e: float) -> float:
        return (
            stats.norm.cdf(-e * sigma + 1 / (2 * sigma))
            - math.exp(e) * stats.norm.cdf(-e * sigma - 1 / (2 * sigma))
            - delta
        )

    return optimize.brentq(gap, 0.0, 100.0)


# -------------------------------------------------------------- published test vectors


@pytest.mark.parametrize(
    ("sigma", "steps", "classic", "balle"),
    [(1.12, 14063, 2.92, 2.52), (0.6, 7032, 9.75, 8.77), (1.2, 2344, 1.20, 0.93)],
)
def test_tf_privacy_mnist_rows(sigma, steps, classic, balle):
    kw = {
        "sampling_rate": MNIST_Q,
        "steps": steps,
        "noise_multiplier": sigma,
        "delta": 1e-5,
    }
    assert epsilon(**kw, conversion="classic") == pytest.approx(classic, abs=0.01)
    assert epsilon(**kw, conversion="balle") == pytest.approx(balle, abs=0.01)


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "eps", "target"),
    [
        (1 / 25, 1.8408203125, 750, 2.996, 3.0),
        (1 / 30, 2.63671875, 1200, 1.995, 2.0),
        (1 / 30, 4.8046875, 1200, 0.994, 1.0),
    ],
)
def test_dp_sat_rows(q, sigma, steps, eps, target):
    got = epsilon(sampling_rate=q, steps=steps, noise_multiplier=sigma, delta=1e-5)
    assert got == pytest.approx(eps, abs=1e-3)
    assert got <= target  # Opacus' calibration guarantee that DP-SAT relied on


def test_dp_fedsam_client_level():
    orders = np.arange(1.01, 100.0, 0.05)  # eps_computer.py's 1.01:0.05:100
    kw = {
        "sampling_rate": 0.1,
        "noise_multiplier": 0.95,
        "delta": 5e-3,
        "orders": orders,
    }
    assert epsilon(steps=200, **kw) == pytest.approx(7.773, abs=1e-3)
    assert epsilon(steps=300, **kw) == pytest.approx(9.934, abs=1e-3)


# ------------------------------------------------------ accountants against each other


@pytest.mark.parametrize(
    ("sigma", "rdp_ref", "pld_ref"), [(1.1, 5.63, 5.19), (4.0, 1.036, 0.947)]
)
def test_prv_pld_agree_and_beat_rdp(sigma, rdp_ref, pld_ref):
    kw = {
        "sampling_rate": 0.01,
        "steps": 10_000,
        "noise_multiplier": sigma,
        "delta": 1e-5,
    }
    rdp, prv, pld = (epsilon(**kw, accountant=a) for a in ("rdp", "prv", "pld"))
    assert rdp == pytest.approx(rdp_ref, abs=0.01)
    assert pld == pytest.approx(pld_ref, abs=0.01)
    assert prv == pytest.approx(pld, rel=0.03)
    assert prv < rdp
    assert pld < rdp


def test_cross_device_rdp_much_looser():
    # PRIVACY.md: 100 of 1e6 clients per round, σ=1, δ=1e-6, 2000 rounds.
    kw = {"sampling_rate": 1e-4, "steps": 2000, "noise_multiplier": 1.0, "delta": 1e-6}
    assert epsilon(**kw, accountant="rdp") == pytest.approx(0.59, abs=0.01)
    assert epsilon(**kw, accountant="pld") == pytest.approx(0.022, abs=0.003)
    assert epsilon(**kw, accountant="prv") < 0.05


@pytest.mark.parametrize(("sigma", "steps"), [(2.0, 1), (5.0, 4)])
def test_unsampled_gaussian_matches_closed_form(sigma, steps):
    # q = 1: T Gaussian steps with multiplier σ are one Gaussian step with σ/√T.
    exact = gaussian_exact_epsilon(sigma / math.sqrt(steps), 1e-5)
    kw = {
        "sampling_rate": 1.0,
        "steps": steps,
        "noise_multiplier": sigma,
        "delta": 1e-5,
    }
    pld = epsilon(**kw, accountant="pld")
    prv = epsilon(**kw, accountant="prv")
    rdp = epsilon(**kw, accountant="rdp")
    assert exact - 1e-6 <= pld <= exact + 1e-3
    assert exact - 1e-6 <= prv <= exact + 0.02  # PRV returns the upper end of ±0.01
    # RDP of the unsampled Gaussian is α/(2σ²) per step; Balle et al.'s conversion:
    a = np.array([1 + k / 10 for k in range(1, 100)] + list(range(12, 64)), dtype=float)
    total_rdp = steps * a / (2 * sigma**2)
    conv = total_rdp - (np.log(1e-5) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    assert rdp == pytest.approx(conv.min(), rel=1e-9)
    assert rdp >= exact


@pytest.mark.parametrize("acc", ["rdp", "prv", "pld"])
def test_edge_cases(acc):
    base = {"steps": 100, "delta": 1e-5, "accountant": acc}
    assert epsilon(sampling_rate=0.0, noise_multiplier=1.0, **base) == 0.0
    assert epsilon(sampling_rate=0.1, noise_multiplier=0.0, **base) == math.inf
    assert epsilon(sampling_rate=0.0, noise_multiplier=0.0, **base) == 0.0
    assert (
        epsilon(
            sampling_rate=0.1, noise_multiplier=1.0, steps=0, delta=1e-5, accountant=acc
        )
        == 0.0
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sampling_rate": 1.5}, "sampling_rate"),
        ({"sampling_rate": -0.1}, "sampling_rate"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"accountant": "pld", "conversion": "classic"}, "conversion"),
        ({"orders": [0.5, 2.0]}, "orders"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs, name):
    base = {"sampling_rate": 0.01, "steps": 10, "noise_multiplier": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError, match=name):
        epsilon(**{**base, **kwargs})


def test_prv_falls_back_to_rdp_and_says_so(caplog):
    # A history whose PRV grid would need ~6e7 points (ε in the thousands).
    hist = [(0.3, 0.5, 1000)]
    with caplog.at_level(logging.DEBUG, logger="fedflat.privacy.accounting"):
        res = compute_epsilon(hist, delta=1e-5, accountant="prv")
    assert res.accountant == "rdp"
    assert "fell back" in res.note
    assert res.epsilon == compute_epsilon(hist, delta=1e-5, accountant="rdp").epsilon
    assert any("fell back" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("acc", ["rdp", "prv", "pld"])
def test_calibration_round_trip(acc):
    q, steps, target, delta, rtol = 0.04, 750, 3.0, 1e-5, 1e-3
    cal = calibrate(
        sampling_rate=q,
        steps=steps,
        epsilon=target,
        delta=delta,
        accountant=acc,
        rtol=rtol,
    )
    assert cal.accountant == acc
    eps_at = epsilon(
        sampling_rate=q,
        steps=steps,
        noise_multiplier=cal.noise_multiplier,
        delta=delta,
        accountant=acc,
    )
    assert eps_at == pytest.approx(cal.epsilon)
    assert eps_at <= target
    # Minimality: 2·rtol less noise already exceeds the target.
    eps_below = epsilon(
        sampling_rate=q,
        steps=steps,
        delta=delta,
        accountant=acc,
        noise_multiplier=cal.noise_multiplier / (1 + 2 * rtol),
    )
    assert eps_below > target
    assert eps_at > 0.99 * target


def test_calibration_agrees_with_dp_sat_sigma():
    # DP-SAT's σ came from Opacus' bisection (ε tolerance 0.01) for ε=3: ours is at most it.
    s = noise_multiplier(sampling_rate=1 / 25, steps=750, epsilon=3.0, delta=1e-5)
    assert 1.82 < s <= 1.8408203125


def test_calibration_trivial_and_impossible():
    assert noise_multiplier(sampling_rate=0.0, steps=10, epsilon=1.0, delta=1e-5) == 0.0
    with pytest.raises(ValueError, match="epsilon"):
        noise_multiplier(sampling_rate=0.1, steps=10, epsilon=0.0, delta=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        noise_multiplier(sampling_rate=0.1, steps=10, epsilon=-1.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        noise_multiplier(sampling_rate=0.1, steps=10, epsilon=1.0, delta=1.5)
    # RDP cannot certify ε below its floor on the default grid, whatever σ.
    a = np.array([1 + k / 10 for k in range(1, 100)] + list(range(12, 64)), dtype=float)
    floor = np.min(-(np.log(1e-5) + np.log(a)) / (a - 1) + np.log((a - 1) / a))
    assert rdp_epsilon_floor(delta=1e-5) == pytest.approx(floor)
    with pytest.raises(ValueError, match="pld"):
        noise_multiplier(sampling_rate=0.1, steps=10, epsilon=0.9 * floor, delta=1e-5)
    # ... which PLD can.
    s = noise_multiplier(
        sampling_rate=0.1, steps=10, epsilon=0.9 * floor, delta=1e-5, accountant="pld"
    )
    assert (
        epsilon(
            sampling_rate=0.1,
            steps=10,
            noise_multiplier=s,
            delta=1e-5,
            accountant="pld",
        )
        <= 0.9 * floor
    )


def test_disk_cache_round_trip(tmp_path, monkeypatch):
    kw = {"sampling_rate": 0.02, "steps": 500, "epsilon": 2.0, "delta": 1e-5}
    first = calibrate(**kw)
    assert first.evaluations > 0
    path = tmp_path / "cache" / "privacy.json"
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 1
    clear_memory_cache()
    second = calibrate(**kw)
    assert second.evaluations == 0  # served from the file
    assert second.noise_multiplier == first.noise_multiplier
    # A corrupt file is ignored and replaced.
    path.write_text("{not json")
    clear_memory_cache()
    third = calibrate(**kw)
    assert third.evaluations > 0
    assert third.noise_multiplier == first.noise_multiplier
    assert json.loads(path.read_text())["entries"]


def test_unwritable_cache_does_not_fail(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("FEDFLAT_CACHE_DIR", str(blocker / "sub"))  # mkdir must fail
    s = noise_multiplier(sampling_rate=0.02, steps=500, epsilon=2.0, delta=1e-5)
    assert s > 0
    assert blocker.read_text() == "x"


def test_concurrent_cache_writers_leave_valid_json(tmp_path):
    targets = [1.0 + 0.25 * i for i in range(8)]

    def work(e: float) -> None:
        calibrate(sampling_rate=0.02, steps=200, epsilon=e, delta=1e-5)

    threads = [threading.Thread(target=work, args=(e,)) for e in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads((tmp_path / "cache" / "privacy.json").read_text())
    assert 1 <= len(data["entries"]) <= len(targets)  # last-writer-wins may drop some
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]


def test_adaptive_clip_noise_split():
    z, sb = 1.0, 5.0
    zd = adaptive_clip_noise_split(noise_multiplier=z, count_noise=sb)
    assert zd**-2 + (2 * sb) ** -2 == pytest.approx(z**-2)
    assert zd > z
    with pytest.raises(ValueError, match="count_noise"):
        adaptive_clip_noise_split(noise_multiplier=1.0, count_noise=0.5)


# -------------------------------------------------------------------------- Accountant


def test_accountant_steps_merge_and_match_opacus():
    from opacus.accountants import RDPAccountant

    acc = Accountant()
    ref = RDPAccountant()
    for sigma, q, n in [(1.0, 0.01, 30), (1.5, 0.02, 20), (1.0, 0.01, 10)]:
        for _ in range(n):
            acc.step(sigma, q)
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert acc.history == [(1.0, 0.01, 30), (1.5, 0.02, 20), (1.0, 0.01, 10)]
    assert acc.total_steps == 60
    assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-12)
    # Composition is additive in steps: k single steps equal one segment of k.
    one = Accountant()
    one.step(1.0, 0.01, steps=40)
    two = Accountant()
    two.step(1.0, 0.01, steps=15)
    two.step(1.0, 0.01, steps=25)
    assert two.history == [(1.0, 0.01, 40)]
    assert one.epsilon(1e-5) == two.epsilon(1e-5)


def test_accountant_rejects_bad_step_and_keeps_history():
    acc = Accountant()
    acc.step(1.0, 0.1, steps=5)
    with pytest.raises(ValueError, match="sampling_rate"):
        acc.step(1.0, 1.2)
    assert acc.history == [(1.0, 0.1, 5)]


def test_would_exceed_stops_before_budget():
    acc = Accountant()
    budget, delta = 1.0, 1e-5
    steps = 0
    while not acc.would_exceed(2.0, 0.05, 1, budget, delta):
        acc.step(2.0, 0.05)
        steps += 1
    assert acc.epsilon(delta) <= budget
    after = epsilon(
        sampling_rate=0.05, steps=steps + 1, noise_multiplier=2.0, delta=delta
    )
    assert after > budget
    assert steps > 0
    with pytest.raises(ValueError, match="epsilon_budget"):
        acc.would_exceed(2.0, 0.05, 1, 0.0, delta)


def test_state_dict_round_trip_and_validation():
    acc = Accountant(accountant="rdp", conversion="classic")
    acc.step(1.0, 0.01, steps=100)
    acc.step(2.0, 0.01, steps=50)
    sd = json.loads(json.dumps(acc.state_dict()))
    other = Accountant(accountant="rdp", conversion="classic")
    other.load_state_dict(sd)
    assert other.history == acc.history
    assert other.epsilon(1e-5) == acc.epsilon(1e-5)
    for key in ("history", "mechanism", "conversion", "orders"):
        broken = {k: v for k, v in sd.items() if k != key}
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(broken)
    with pytest.raises(ValueError, match="pld"):
        Accountant(accountant="rdp", conversion="classic").load_state_dict(
            {**sd, "mechanism": "pld"}
        )
    with pytest.raises(ValueError, match="conversion"):
        Accountant().load_state_dict(sd)
    target = Accountant(accountant="rdp", conversion="classic")
    with pytest.raises(ValueError, match=r"history\[1\]"):
        target.load_state_dict({**sd, "history": [[1.0, 0.01, 5], [1.0, 2.0, 5]]})
    assert target.history == []  # unchanged on error


def test_epsilons_groups_identical_histories(monkeypatch):
    accs = []
    for i in range(300):
        a = Accountant()
        a.step(1.0, 0.05 if i % 3 else 0.1, steps=10 * (1 + i % 2))
        accs.append(a)
    calls = []
    real = accountant_mod.compute_epsilon

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(accountant_mod, "compute_epsilon", counting)
    eps = epsilons(accs, 1e-5)
    assert len(calls) == 4  # (q ∈ {0.05, 0.1}) × (steps ∈ {10, 20})
    for i in (0, 1, 2, 3, 299):
        h = accs[i].history[0]
        ref = epsilon(sampling_rate=h[1], steps=h[2], noise_multiplier=h[0], delta=1e-5)
        assert eps[i] == ref


# ----------------------------------------------------------------------- PrivacyConfig


def _errors(data, **kw):
    with pytest.raises(ValidationError) as info:
        PrivacyConfig.model_validate(data, **kw)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_privacy_config_defaults_and_valid():
    cfg = PrivacyConfig.model_validate({})
    assert not cfg.enabled
    cfg = PrivacyConfig.model_validate(
        {
            "accountant": "pld",
            "sample_level": {
                "enabled": True,
                "epsilon": 3.0,
                "expected_batch_size": 32,
            },
            "user_level": {
                "enabled": True,
                "noise_multiplier": 1.0,
                "adaptive_clipping": {"enabled": True},
            },
        },
        context={"expected_clients_per_round": 100},
    )
    assert cfg.enabled
    ac = cfg.user_level.adaptive_clipping
    assert (ac.target_quantile, ac.clip_lr, ac.initial_clip) == (0.5, 0.2, 0.1)
    assert ac.resolved_count_noise(100) == 5.0


@pytest.mark.parametrize(
    ("data", "loc", "text"),
    [
        (
            {"sample_level": {"enabled": True}},
            ("sample_level", "epsilon"),
            "noise_multiplier, epsilon, or both",
        ),
        ({"user_level": {"enabled": True}}, ("user_level", "epsilon"), "or both"),
        (
            {"sample_level": {"epsilon": 0.0}},
            ("sample_level", "epsilon"),
            "greater than 0",
        ),
        ({"user_level": {"delta": 1.0}}, ("user_level", "delta"), "less than 1"),
        ({"sample_level": {"delta": 0.0}}, ("sample_level", "delta"), "greater than 0"),
        ({"sample_level": {"clip": 1.0}}, ("sample_level", "clip"), "not a key of mechanism"),
        (
            {"sample_level": {"expected_batch_size": 8, "sampling_rate": 0.1}},
            ("sample_level", "sampling_rate"),
            "at most one",
        ),
        ({"accountant": "gdp"}, ("accountant",), ""),
        ({"accountant": "prv", "conversion": "classic"}, ("conversion",), "rdp"),
        (
            {
                "user_level": {
                    "enabled": True,
                    "noise_multiplier": 1.0,
                    "adaptive_clipping": {"enabled": True, "count_noise": 0.5},
                }
            },
            ("user_level", "adaptive_clipping"),
            "2 * count_noise",
        ),
        (
            {"user_level": {"adaptive_clipping": {"target_quantile": 1.0}}},
            ("user_level", "adaptive_clipping", "target_quantile"),
            "less than 1",
        ),
    ],
)
def test_privacy_config_errors_name_the_key(data, loc, text):
    errs = _errors(data)
    assert any(e_loc == loc and text in msg for e_loc, msg in errs), errs


def test_privacy_config_default_count_noise_checked_with_context():
    data = {
        "user_level": {
            "enabled": True,
            "noise_multiplier": 1.0,
            "adaptive_clipping": {"enabled": True},
        }
    }
    errs = _errors(data, context={"expected_clients_per_round": 10})  # σ_b = 0.5 ≤ z/2
    assert any(loc == ("user_level", "adaptive_clipping") for loc, _ in errs)
    PrivacyConfig.model_validate(data, context={"expected_clients_per_round": 50})


# ---------------------------------------------------------------------------------- CLI


def _parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_privacy_parser(sub)
    return parser.parse_args(["privacy", *argv])


def test_cli_epsilon_json(capsys):
    args = _parse(
        [
            "--sampling-rate",
            "0.04",
            "--steps",
            "750",
            "--delta",
            "1e-5",
            "--noise-multiplier",
            "1.8408203125",
            "--json",
        ]
    )
    assert args.func is run_privacy
    assert run_privacy(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "computed",
        "sampling_rate",
        "steps",
        "delta",
        "noise_multiplier",
        "epsilon",
        "accountant",
        "accountant_used",
        "note",
    ):
        assert key in out
    assert out["computed"] == "epsilon"
    assert out["epsilon"] == pytest.approx(2.996, abs=1e-3)
    assert (out["sampling_rate"], out["steps"], out["delta"]) == (0.04, 750, 1e-5)


def test_cli_noise_multiplier_text_and_json(capsys):
    argv = [
        "--sampling-rate",
        "0.04",
        "--steps",
        "750",
        "--delta",
        "1e-5",
        "--epsilon",
        "3",
    ]
    assert run_privacy(_parse(argv)) == 0
    assert "noise_multiplier" in capsys.readouterr().out
    assert run_privacy(_parse([*argv, "--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["computed"] == "noise_multiplier"
    assert out["epsilon"] <= 3.0
    assert out["target_epsilon"] == 3.0
    assert 1.82 < out["noise_multiplier"] <= 1.8408203125


def test_cli_errors_and_registration(capsys):
    args = _parse(
        ["--sampling-rate", "0.04", "--steps", "750", "--delta", "2", "--epsilon", "3"]
    )
    assert run_privacy(args) == 2
    assert "delta" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of --noise-multiplier / --epsilon
        _parse(["--sampling-rate", "0.1", "--steps", "5", "--delta", "1e-5"])
    with pytest.raises(SystemExit):
        _parse(
            [
                "--sampling-rate",
                "0.1",
                "--steps",
                "5",
                "--delta",
                "1e-5",
                "--epsilon",
                "1",
                "--noise-multiplier",
                "1",
            ]
        )
    handlers = {}
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub, handlers)
    assert handlers["privacy"] is run_privacy


def test_cli_infinite_epsilon_is_valid_json(capsys):
    args = _parse(
        [
            "--sampling-rate",
            "0.1",
            "--steps",
            "5",
            "--delta",
            "1e-5",
            "--noise-multiplier",
            "0",
            "--json",
        ]
    )
    assert run_privacy(args) == 0
    assert json.loads(capsys.readouterr().out)["epsilon"] == "inf"
