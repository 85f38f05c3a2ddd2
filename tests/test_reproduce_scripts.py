"""Smoke runs of the reproduction scripts' ``--quick`` modes (in a subprocess)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=590, check=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reproduce_compression_quick(tmp_path):
    out = tmp_path / "compression.md"
    proc = _run("reproduce_compression.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    d = 61 * 10  # logistic regression 60 -> 10
    # Bytes per message from the documented wire format (4 B header each).
    expected = {
        "fp32": 4 + 4 * d,
        "fp16": 4 + 2 * d,
        "qsgd s=4": 4 + 4 + math.ceil(d * math.ceil(math.log2(2 * 4 + 1)) / 8),
        "top_k 1% + EF": 4 + 8 * math.ceil(0.01 * d),  # k float32 values + k int32 indices
        "random_k 10%": 4 + 4 * math.ceil(0.1 * d) + 8,  # values + an 8 B seed
        "sign": 4 + 4 + math.ceil(d / 8),
    }
    for codec, nbytes in expected.items():
        assert f"| {codec} | {nbytes} |" in text
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert len(runs) == 8
    fp32 = next(r for r in runs if r["name"] == "fp32")
    # 3 rounds × 10 clients, no stragglers in part A: every message is 4 + 4d bytes.
    assert fp32["curve"][-1]["bytes_up"] == 3 * 10 * expected["fp32"]
    drop = next(r for r in runs if r["name"] == "FedAvg (drop)")
    # round(0.9 × 10) = 9 of 10 participants are stragglers and are discarded.
    assert all(pt["clients"] <= 1 for pt in drop["curve"])
    assert all(0.0 <= r["final_acc"] <= 1.0 for r in runs)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reproduce_dpsat_quick(tmp_path):
    data = os.environ.get("FEDFLAT_DATA")
    if not data or not all(Path(data, p).exists() for p in ("mnist", "femnist")):
        pytest.skip("FEDFLAT_DATA with mnist/ and femnist/ is needed")
    out = tmp_path / "dpsat.md"
    proc = _run("reproduce_dpsat.py", out, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert {(r["setting"], r["mechanism"]) for r in runs} == {
        (s, m) for s in ("central", "femnist", "mnist_dir") for m in ("dp_sgd", "dp_sat")}
    for r in runs:
        assert 0.0 < r["epsilon_spent"] <= 3.0  # the calibrated budget is never exceeded
        assert 0.0 <= r["final_acc"] <= 1.0
    for s in ("central", "femnist", "mnist_dir"):
        # DP-SAT is accounted exactly as DP-SGD (ALGORITHMS.md §4.2): the same σ.
        sig = {r["sigma"] for r in runs if r["setting"] == s}
        assert len(sig) == 1
    text = out.read_text()
    assert all(f"| {s} | 3 |" in text for s in ("central", "femnist", "mnist_dir"))
