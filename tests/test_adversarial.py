"""Federated adversarial training: PGD against independent facts (ball, range, the closed-form
worst case of a linear model), composition with SAM and DP, refusals."""

from __future__ import annotations

import pytest
import torch

import fedflat
from fedflat.client.adversarial import PGD, pgd
from fedflat.errors import ScenarioError
from fedflat.scenario.loader import load_scenario


def _gen(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_data_range(norm):
    g = _gen(10)
    x = torch.rand(32, 1, 4, 4, generator=g)
    w = torch.randn(16, 3, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    eps = 0.3 if norm == "linf" else 1.5
    attack = PGD(eps, step_size=0.2, steps=10, norm=norm, random_start=True)

    def loss(xa):
        return torch.nn.functional.cross_entropy(xa.flatten(1) @ w, y)

    xa = pgd(loss, x, attack, _gen())
    d = (xa - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert xa.min() >= 0.0
    assert xa.max() <= 1.0
    assert loss(xa) > loss(x)  # the attack ascends


def test_linf_pgd_on_linear_model_reaches_closed_form_worst_case():
    """Binary linear model, loss ℓ(y·wᵀx) with ℓ decreasing (logistic). Over the ℓ∞ ball the
    margin y·wᵀ(x+δ) is minimised by δ* = −ε·y·sign(w) (Hölder: y·wᵀδ ≥ −ε‖w‖₁, with equality
    exactly there), so the worst case is x − ε·y·sign(w) — coordinate-wise, reached by the
    sign steps after ⌈2ε/α⌉ steps from any start (here no data-range clip)."""
    g = _gen(11)
    d, n, eps = 7, 20, 0.25
    w = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g) * 2.0 - 1.0  # ±1

    def loss(xa):
        return torch.nn.functional.softplus(-y * (xa @ w)).mean()

    attack = PGD(eps, step_size=0.05, steps=25, norm="linf", random_start=True,
                 clip_min=None, clip_max=None)
    xa = pgd(loss, x, attack, _gen(5))
    expected = x - eps * y[:, None] * torch.sign(w)[None, :]
    assert torch.allclose(xa, expected, atol=1e-6)
    # And the worst-case loss is softplus(−(y·wᵀx − ε‖w‖₁)).
    margin = y * (x @ w) - eps * w.abs().sum()
    assert torch.allclose(loss(xa), torch.nn.functional.softplus(-margin).mean(), atol=1e-6)


def test_l2_pgd_on_linear_model_reaches_closed_form():
    """Same model over the ℓ2 ball: δ* = −ε·y·w/‖w‖₂ (Cauchy–Schwarz); normalised-gradient
    steps move along −y·w exactly, so PGD from 0 lands on it once α·k ≥ ε."""
    g = _gen(12)
    d, n, eps = 5, 10, 0.5
    w = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, 2, (n,), generator=g) * 2.0 - 1.0

    def loss(xa):
        return torch.nn.functional.softplus(-y * (xa @ w)).mean()

    attack = PGD(eps, step_size=0.2, steps=5, norm="l2", random_start=False,
                 clip_min=None, clip_max=None)
    xa = pgd(loss, x, attack, _gen())
    assert torch.allclose(xa, x - eps * y[:, None] * (w / w.norm())[None, :], atol=1e-6)


def adversarial_scenario(**adv) -> dict:
    """A small digits scenario with an adversarial block (test_zo uses it too)."""
    return {
        "name": "adv", "seed": 2,
        "data": {"dataset": "digits", "num_clients": 6, "partition": {"method": "iid"}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.1, "batch_size": 32, "local_steps": 3},
        "server": {"rounds": 2, "clients_per_round": 3},
        "runtime": {"threads": 1}, "eval": {"every": 1},
        "output": {"checkpoint_every": 0, "plots": False, "progress": False},
        "adversarial": {"epsilon": 0.2, "step_size": 0.1, "steps": 3, "eval_steps": 5,
                        "eval_samples": 100, **adv},
    }


def test_adversarial_training_changes_training_and_logs_robust_accuracy(tmp_path):
    clean = fedflat.run(adversarial_scenario(enabled=False, evaluate=True), out=tmp_path / "c")
    adv = fedflat.run(adversarial_scenario(enabled=True), out=tmp_path / "a")
    assert not torch.equal(clean.params, adv.params)
    for res in (clean, adv):
        last = res.metrics[-1]
        assert 0.0 <= last["robust_test_accuracy"] <= last["test_accuracy"] + 0.1
    off = fedflat.run(adversarial_scenario(enabled=False), out=tmp_path / "o")
    assert "robust_test_accuracy" not in off.metrics[-1]
    assert torch.equal(off.params, clean.params)  # evaluation does not touch training


def test_sam_plus_adversarial_runs_and_differs_from_each_alone(tmp_path):
    sam = {"client": {"lr": 0.1, "batch_size": 32, "local_steps": 3,
                      "oracle": {"name": "sam", "rho": 0.05}}}
    both = fedflat.run({**adversarial_scenario(enabled=True), **sam}, out=tmp_path / "b")
    sam_only = fedflat.run({**adversarial_scenario(enabled=False), **sam}, out=tmp_path / "s")
    adv_only = fedflat.run(adversarial_scenario(enabled=True), out=tmp_path / "a")
    assert torch.isfinite(both.params).all()
    assert not torch.equal(both.params, sam_only.params)
    assert not torch.equal(both.params, adv_only.params)


def test_adversarial_with_dp_sgd_runs(tmp_path):
    sc = adversarial_scenario(enabled=True)
    sc["privacy"] = {"sample_level": {"enabled": True, "noise_multiplier": 1.0,
                                      "clip_norm": 1.0}}
    res = fedflat.run(sc, out=tmp_path / "dp")
    assert torch.isfinite(res.params).all()


@pytest.mark.parametrize(("over", "key"), [
    ({"runtime": {"backend": "vmap", "threads": 1}}, "adversarial.enabled"),
    ({"model": {"name": "cnn", "norm": "batch"}}, "model.norm"),
    ({"adversarial": {"enabled": True, "clip_min": 1.0, "clip_max": 0.5}},
     "adversarial.clip_max"),
])
def test_adversarial_refusals(over, key):
    sc = {**adversarial_scenario(enabled=True), **over}
    with pytest.raises(ScenarioError) as info:
        load_scenario(sc)
    assert key in str(info.value)


@pytest.mark.slow
def test_reproduce_adversarial_quick_table(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_adversarial.py"
    spec = importlib.util.spec_from_file_location("reproduce_adversarial", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "adv.md"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| FedAvg |", "| FedAvg + PGD-AT |", "| FedSAM + PGD-AT |"):
        assert row in text
