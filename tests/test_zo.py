"""Zeroth-order clients: estimator moments against closed forms, seed uplink == vector uplink."""

from __future__ import annotations

import pytest
import torch

import fedflat
from fedflat.client.zeroth_order import zo_gradient
from fedflat.comm.codecs import HEADER_NBYTES
from fedflat.errors import ScenarioError
from fedflat.scenario.loader import load_scenario


def _gen(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


@pytest.mark.parametrize("kind", ["gaussian", "sphere"])
@pytest.mark.parametrize("q", [1, 4, 16])
def test_error_vs_q_matches_variance_formula_on_quadratic(kind, q):
    """f(w) = ½‖w‖² + bᵀw, g = ∇f(w) = w + b. The two-point scalar is exact:
    c = (f(w + μu) − f(w))/μ = gᵀu + (μ/2)‖u‖².

    Gaussian u ~ N(0, I): one direction v = c·u has E v = E[u uᵀ] g + (μ/2) E[‖u‖² u] = g (odd
    moments vanish), so it is unbiased for ∇f (= ∇f_μ for a quadratic), and
    E‖v − g‖² = E[(gᵀu)²‖u‖²] − ‖g‖² + (μ²/4) E‖u‖⁶ = (d + 2)‖g‖² − ‖g‖² + (μ²/4) d(d+2)(d+4)
    (Isserlis: E[(gᵀu)² ‖u‖²] = (d + 2)‖g‖²; E‖u‖⁶ = d(d+2)(d+4), χ²_d moments).
    Sphere u uniform on S^{d−1}, v = d·c·u = d(gᵀu)u + (dμ/2)u: E[u uᵀ] = I/d gives E v = g and
    E‖v − g‖² = d²E[(gᵀu)²] − ‖g‖² + d²μ²/4 = (d − 1)‖g‖² + d²μ²/4.
    The mean of q i.i.d. directions divides the error by q. Checked by Monte Carlo with
    T trials: the relative standard error of the mean squared error is ≲ √(var/T)/mean.
    """
    d, mu, trials = 8, 0.3, 6000 // q
    g0 = _gen(1)
    b = torch.randn(d, generator=g0, dtype=torch.float64)
    w = torch.randn(d, generator=g0, dtype=torch.float64)
    g = w + b

    def f(v):
        return 0.5 * v.dot(v) + b.dot(v)

    errs, mean = [], torch.zeros(d, dtype=torch.float64)
    for t in range(trials):
        _, est, _ = zo_gradient(f, w, seed=1000 + t, q=q, mu=mu, kind=kind)
        est = est.double()
        errs.append(float((est - g).pow(2).sum()))
        mean += est / trials
    gg = float(g.dot(g))
    if kind == "gaussian":
        expected = ((d + 1) * gg + mu**2 * d * (d + 2) * (d + 4) / 4) / q
    else:
        expected = ((d - 1) * gg + d**2 * mu**2 / 4) / q
    mse = sum(errs) / trials
    assert mse == pytest.approx(expected, rel=0.12)
    # Unbiased: the mean estimate is within 4 standard errors of g in every coordinate.
    assert float((mean - g).abs().max()) < 4 * (expected / d / trials) ** 0.5 * 1.5


def test_unbiased_for_smoothed_gradient_on_logistic_model():
    """Logistic loss, small μ: ∇f_μ = ∇f + O(μ²) (f smooth, Gaussian smoothing is even), so
    the mean of many estimates matches autograd's gradient within the Monte Carlo error."""
    d, n = 6, 40
    g0 = _gen(2)
    x = torch.randn(n, d, generator=g0, dtype=torch.float64)
    y = (torch.rand(n, generator=g0, dtype=torch.float64) < 0.5).double()
    w = 0.3 * torch.randn(d, generator=g0, dtype=torch.float64)

    def f(v):
        return torch.nn.functional.binary_cross_entropy_with_logits(x @ v, y)

    wg = w.clone().requires_grad_(True)
    (true,) = torch.autograd.grad(f(wg), wg)
    trials, q = 1500, 4
    mean = torch.zeros(d, dtype=torch.float64)
    for t in range(trials):
        mean += zo_gradient(f, w, seed=t, q=q, mu=1e-4, kind="gaussian")[1].double() / trials
    se = ((d + 1) * float(true.dot(true)) / q / trials / d) ** 0.5
    assert float((mean - true).abs().max()) < 4 * se


def _scenario(**zo) -> dict:
    return {
        "name": "zo", "seed": 4,
        "data": {"dataset": "digits", "num_clients": 6, "partition": {"method": "iid"}},
        "model": {"name": "logistic"},
        "client": {"lr": 0.05, "batch_size": 32, "local_steps": 4, "momentum": 0.5,
                   "zeroth_order": {"enabled": True, "queries": 5, "mu": 1e-3, **zo}},
        "server": {"rounds": 3, "clients_per_round": 3},
        "runtime": {"threads": 1}, "eval": {"every": 1},
        "output": {"checkpoint_every": 0, "plots": False, "progress": False},
    }


@pytest.mark.parametrize("kind", ["gaussian", "sphere"])
def test_seed_uplink_equals_vector_uplink_with_exact_bytes(tmp_path, kind):
    vec = fedflat.run(_scenario(estimator=kind, uplink="vector"), out=tmp_path / "v")
    seeds = fedflat.run(_scenario(estimator=kind, uplink="seeds"), out=tmp_path / "s")
    # The server rebuilt every delta from seeds (and checked it bit for bit): same model.
    assert torch.equal(vec.params, seeds.params)
    d = vec.params.numel()  # 64·10 + 10 = 650
    k, q, m = 4, 5, 3
    for rv, rs in zip(vec.metrics, seeds.metrics, strict=True):
        assert rv["bytes_up"] == m * (HEADER_NBYTES + 4 * d)
        assert rs["bytes_up"] == m * (HEADER_NBYTES + 8 * k + 4 * k * q)
        assert rs["client/zo_queries"] == k * (q + 1)


def test_zo_differs_from_first_order_and_learns(tmp_path):
    res = fedflat.run(_scenario(queries=20), out=tmp_path / "z")
    first = fedflat.run({**_scenario(), "client": {"lr": 0.05, "batch_size": 32,
                                                   "local_steps": 4, "momentum": 0.5}},
                        out=tmp_path / "f")
    assert not torch.equal(res.params, first.params)
    assert res.metrics[-1]["test_loss"] < res.metrics[0]["test_loss"] + 1.0  # finite, sane
    assert torch.isfinite(res.params).all()


@pytest.mark.parametrize(("over", "key"), [
    ({"runtime": {"backend": "vmap", "threads": 1}}, "client.zeroth_order.enabled"),
    ({"privacy": {"sample_level": {"enabled": True, "noise_multiplier": 1.0}}},
     "privacy.sample_level.enabled"),
    ({"comm": {"uplink": {"codec": "fp16"}}}, "comm.uplink.codec"),
    ({"topology": {"kind": "ring"}, "server": {"rounds": 2}}, "topology.kind"),
])
def test_zo_refusals(over, key):
    sc = {**_scenario(uplink="seeds"), **over}
    with pytest.raises(ScenarioError) as info:
        load_scenario(sc)
    assert key in str(info.value)


@pytest.mark.slow
def test_reproduce_zo_quick_table(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_zo.py"
    spec = importlib.util.spec_from_file_location("reproduce_zo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "zo.md"
    assert mod.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    # 10 local steps: seeds send 10·(8 + 4·20) + 4 = 884 bytes, vectors 4·650 + 4 = 2604.
    assert "| ZO-FedAvg q=20, seed uplink |" in text
    assert "| 884 |" in text
    assert "| 2604 |" in text
    assert "identical accuracy" in text


@pytest.mark.slow
def test_ray_equals_serial_with_seed_uplink_and_adversarial(tmp_path, ray_session):
    """What travels (the seed message; the adversarial random starts drawn on the client's
    generator) gives the serial model bit for bit on Ray."""
    from test_adversarial import adversarial_scenario as adv_scenario

    ray = {"runtime": {"backend": "ray", "num_actors": 2, "threads": 1}}
    for name, sc in (("zo", _scenario(uplink="seeds")), ("adv", adv_scenario(enabled=True))):
        serial = fedflat.run(sc, out=tmp_path / f"{name}_s")
        on_ray = fedflat.run({**sc, **ray}, out=tmp_path / f"{name}_r")
        assert torch.equal(serial.params, on_ray.params)
        assert [m.get("bytes_up") for m in serial.metrics] == \
            [m.get("bytes_up") for m in on_ray.metrics]
