"""DIFF2 through ``fedflat.run`` (``privacy.sample_level.mechanism: diff2``).

Independent facts: without noise and clipping v telescopes to the mean gradient (plain
full-batch GD, the gradient written by hand for the logistic model); with clipping the
scenario equals ``diff2_gd`` on the pooled records; the noise on each release has std
σ·C·√P / N (P clients each adding N(0, σ²C²) to their own clipped sum); the ledger's ε is
the closed-form Gaussian RDP R·α/(2σ²) converted; Ray == serial and resumed ==
uninterrupted bit for bit; bad combinations are refused by key.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, set_keys, tiny_scenario

import fedflat
from fedflat.errors import ScenarioError
from fedflat.privacy.diff2 import Diff2Config, clip_rows, diff2_gd
from fedflat.rng import stream
from fedflat.runtime.build import build_data, build_flat_model, initial_params
from fedflat.scenario.loader import load_scenario

LR = 0.5
TINY_SIGMA = 1e-30  # the schema wants σ > 0: this one is below float32 resolution everywhere


def scenario(*, sigma: float = TINY_SIGMA, c1: float = 1.0, c2: float = 0.1, period: int = 3,
             rounds: int = 6, split: str = "rdp_half", **over) -> dict:
    sc = tiny_scenario(**{
        "data.num_clients": 4, "data.synthetic.min_size": 10, "data.synthetic.max_size": 60,
        "server.clients_per_round": 4, "server.rounds": rounds,
        "client.lr": LR, "client.batch_size": 1000, "client.local_steps": 1,
        "eval.every": rounds, "output.plots": False, "output.progress": False,
        "output.keep_checkpoints": 20,
    })
    sc["privacy"] = {"sample_level": {
        "enabled": True, "mechanism": "diff2", "noise_multiplier": sigma, "clip_norm": c1,
        "diff2": {"period": period, "clip_diff": c2, "sigma_split": split}}}
    return set_keys(sc, over)


def pooled(sc: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, w0) in float64: every client's training records stacked, the initial model."""
    s = load_scenario(sc).scenario
    fed = build_data(s)
    ix = torch.as_tensor(np.concatenate(fed.client_indices))
    w0 = initial_params(s, build_flat_model(s, fed.dataset))
    return (fed.dataset.x_train[ix].flatten(1).double(), fed.dataset.y_train[ix],
            w0.double())


def logistic_rows(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    """Per-record cross-entropy gradients of Linear(F, C) by hand: [(p − e_y) ⊗ x, p − e_y]
    in the flat layout (weight [C, F] row-major, then bias)."""
    n, f = x.shape
    c = 10

    def rows(w: torch.Tensor) -> torch.Tensor:
        weight, bias = w[: c * f].view(c, f), w[c * f:]
        err = torch.softmax(x @ weight.T + bias, 1) - torch.nn.functional.one_hot(y, c).double()
        return torch.cat([(err[:, :, None] * x[:, None, :]).reshape(n, -1), err], 1)

    return rows


def test_noiseless_unclipped_diff2_is_full_batch_gd(tmp_path):
    sc = scenario(c1=1e6, c2=1e6, period=3, rounds=6)
    res = fedflat.run(sc, out=tmp_path / "r")
    x, y, w = pooled(sc)
    rows = logistic_rows(x, y)
    for _ in range(6):  # GD on the mean loss over all N records
        w = w - LR * rows(w).mean(0)
    torch.testing.assert_close(res.params.double(), w, atol=2e-6, rtol=1e-5)


def test_scenario_equals_diff2_gd_with_clipping(tmp_path):
    sc = scenario(c1=0.5, c2=0.02, period=3, rounds=7)
    res = fedflat.run(sc, out=tmp_path / "r")
    # Both clips bite (otherwise this would only repeat the test above).
    assert res.metrics[0]["client/dp_frac_clipped"] > 0.2
    assert res.metrics[1]["client/dp_frac_clipped"] > 0.2
    assert [m["client/diff2_full_round"] for m in res.metrics] == [1, 0, 0, 1, 0, 0, 1]
    x, y, w0 = pooled(sc)
    cfg = Diff2Config(lr=LR, rounds=7, period=3, clip_full=0.5, clip_diff=0.02, sigma=0.0)
    ref = diff2_gd(logistic_rows(x, y), w0, cfg, stream(0, "noise"))
    torch.testing.assert_close(res.params.double(), ref, atol=2e-6, rtol=1e-5)


def test_release_noise_has_std_sigma_c_sqrt_p_over_n(tmp_path):
    sigma, c1, c2 = 5.0, 1.0, 0.1
    runs = [fedflat.run(scenario(sigma=sigma, c1=c1, c2=c2, period=2, rounds=r, split="equal"),
                        out=tmp_path / f"r{r}").params.double() for r in (1, 2)]
    x, y, w0 = pooled(scenario())
    rows, n, p = logistic_rows(x, y), len(y), 4
    v0 = (w0 - runs[0]) / LR
    noise0 = v0 - clip_rows(rows(w0), c1).sum(0) / n  # full release at x0
    v1 = (runs[0] - runs[1]) / LR
    noise1 = (v1 - v0) - clip_rows(rows(runs[0]) - rows(w0), c2).sum(0) / n  # difference
    d = len(w0)
    for noise, c in ((noise0, c1), (noise1, c2)):
        want = sigma * c * math.sqrt(p) / n
        assert float(noise.std()) == pytest.approx(want, rel=0.15)
        assert abs(float(noise.mean())) < 4 * want / math.sqrt(d)


def _closed_form_epsilon(inv_var_sum: float, delta: float) -> float:
    """ε of Gaussian releases (q = 1) with Σ 1/σ_r² = inv_var_sum: RDP α·Σ/2, Balle et al.'s
    conversion, minimised over Opacus' default orders."""
    orders = np.array([1 + k / 10 for k in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = orders * inv_var_sum / 2
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.nanmin(eps))


@pytest.mark.parametrize("split", ["equal", "rdp_half"])
def test_ledger_epsilon_is_dp_gd_closed_form(tmp_path, split):
    sigma, rounds, period = 3.0, 6, 4
    res = fedflat.run(scenario(sigma=sigma, rounds=rounds, period=period, split=split),
                      out=tmp_path / "r")
    priv = json.loads((res.run_dir / "privacy.json").read_text())["sample_level"]
    want = _closed_form_epsilon(rounds / sigma**2, 1e-5)  # DP-GD: R releases at σ
    assert priv["epsilon_per_client"] == pytest.approx([want] * 4, rel=1e-9)
    s1, s2 = priv["diff2_noise_multipliers"]["full"], priv["diff2_noise_multipliers"]["difference"]
    if split == "equal":
        assert (s1, s2) == (sigma, sigma)
    else:  # K = 2 full rounds of 6: half of R/σ² on each kind
        assert s1 == pytest.approx(sigma * math.sqrt(4 / 6))
        assert s2 == pytest.approx(sigma * math.sqrt(8 / 6))
    assert res.metrics[-1]["epsilon_sample_max"] == pytest.approx(want, rel=1e-9)


def test_epsilon_target_is_calibrated_and_met(tmp_path):
    sc = scenario(rounds=6, period=3)
    sc["privacy"]["sample_level"].pop("noise_multiplier")
    sc["privacy"]["sample_level"]["epsilon"] = 2.0
    res = fedflat.run(sc, out=tmp_path / "r")
    priv = json.loads((res.run_dir / "privacy.json").read_text())["sample_level"]
    sigma = priv["noise_multiplier"]
    spent = _closed_form_epsilon(6 / sigma**2, 1e-5)
    assert 1.95 < spent <= 2.0
    assert max(priv["epsilon_per_client"]) == pytest.approx(spent, rel=1e-9)
    assert res.summary["status"] == "completed"


def _rewind(run_dir: Path, to_round: int) -> None:
    for p in (run_dir / "checkpoints").iterdir():
        if int(p.stem.split("_")[1]) > to_round:
            p.unlink()
    (run_dir / "final_model.pt").unlink()


def test_resume_mid_period_equals_uninterrupted(tmp_path):
    sc = scenario(sigma=2.0, rounds=7, period=4, **{"output.checkpoint_every": 1})
    reference = fedflat.run(sc, out=tmp_path / "ref")
    again = fedflat.run(sc, out=tmp_path / "again")
    _rewind(again.run_dir, 2)  # rounds 2 and 3 are difference rounds: v and x_{r-1} restored
    resumed = fedflat.resume(again.run_dir)
    assert torch.equal(resumed.params, reference.params)
    assert not torch.equal(reference.params,
                           fedflat.run(scenario(sigma=2.0, rounds=7, period=4),
                                       out=tmp_path / "other_seed_check", overrides=["seed=4"]
                                       ).params)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_equals_serial_bit_for_bit(tmp_path, ray_session):
    sc = scenario(sigma=2.0, rounds=5, period=2)
    serial = fedflat.run(sc, out=tmp_path / "s")
    on_ray = fedflat.run(set_keys(sc, {"runtime.backend": "ray", "runtime.num_actors": 2}),
                         out=tmp_path / "r")
    assert torch.equal(serial.params, on_ray.params)


@pytest.mark.parametrize(("over", "key"), [
    ({"server.clients_per_round": 2}, "server.clients_per_round"),
    ({"server.sampling": "poisson"}, "server.clients_per_round"),
    ({"client.local_steps": 2}, "client.local_steps"),
    ({"client.momentum": 0.9}, "client.optimizer"),
    ({"client.correction.prox_mu": 0.1}, "client.correction"),
    ({"privacy.sample_level.expected_batch_size": 8},
     "privacy.sample_level.expected_batch_size"),
    ({"server.aggregation.rule": "median"}, "server.aggregation.rule"),
    ({"comm.uplink.codec": "fp16"}, "comm.uplink.codec"),
    ({"comm.downlink.codec": "fp16"}, "comm.downlink.codec"),
    ({"system.dropout": 0.1}, "system.dropout"),
    ({"runtime.backend": "vmap"}, "runtime.backend"),
    ({"flower.secagg": True}, "flower.secagg"),
    ({"topology.kind": "ring"}, "topology.kind"),
])
def test_bad_combinations_are_refused_by_key(over, key):
    with pytest.raises(ScenarioError) as info:
        load_scenario(scenario(**over))
    assert key in str(info.value)
    assert "diff2" in str(info.value)


def test_personalization_is_refused_with_privacy():
    # The personalization check (any DP) names it first; DIFF2's own check agrees.
    with pytest.raises(ScenarioError, match=r"personalization\.method"):
        load_scenario(scenario(**{"personalization.method": "ditto"}))


@pytest.mark.slow  # one CLI start: 5-20 s on a loaded machine
def test_batch_smaller_than_a_client_is_one_line_exit_2_and_no_folder(tmp_path):
    import yaml

    sc = scenario(**{"client.batch_size": 10})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "run", str(path), "--out",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "client.batch_size" in lines[0]
    assert "s.yaml" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow  # five short fedflat runs (~10 s of CPU)
def test_reproduce_diff2_quick_table(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce_diff2",
                                                  REPO / "scripts" / "reproduce_diff2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "t.md"
    assert mod.main(["--quick", "--out", str(out), "--out-dir", str(tmp_path / "runs")]) == 0
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) == 5  # header + GD + DP-GD + two DIFF2 rows
    assert sum("(spent 1.000)" in r for r in rows) == 3  # equal ε: the same ledger


def test_flower_front_ends_refuse_diff2(tmp_path):
    pytest.importorskip("flwr")
    from fedflat.flower.app import write_app
    from fedflat.flower.simulate import simulate

    for call in (lambda: simulate(scenario(), out=tmp_path / "sim"),
                 lambda: write_app(scenario(), tmp_path / "app")):
        with pytest.raises(ScenarioError, match=r"privacy\.sample_level\.mechanism"):
            call()
    assert not (tmp_path / "sim").exists()
