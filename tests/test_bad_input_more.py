"""More bad inputs, each through a real ``fedflat`` subprocess: one located line, exit 2, no
traceback, and (for ``run``) no run folder left behind. A CLI start costs ~5 s (torch): the
tests that start two (``validate`` and ``run``) are marked slow.

The scenario files are written here, so the line each error must name is known from the
text, not from the code under test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

# Lines 1-8; blocks appended by a test start at line 9.
TINY = """\
name: tiny
data:
  dataset: synthetic
  num_clients: 12
  synthetic: {alpha: 1.0, beta: 1.0, max_size: 120}
model: {name: logistic}
client: {lr: 0.05, batch_size: 10, local_epochs: 1}
server: {rounds: 2, clients_per_round: 4, sampling: poisson}
"""


def fedflat(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **env,
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fedflat.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused input (exit 2, no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def scenario(tmp_path: Path, extra: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(TINY + extra)
    return path


def refused_by_validate_and_run(tmp_path: Path, path: Path, *validate_flags: str) -> list[str]:
    """Both commands refuse it; run leaves no folder. Returns the two messages."""
    msg_validate = one_line_error(fedflat("validate", *validate_flags, path.name, cwd=tmp_path))
    runs = tmp_path / "runs"
    msg_run = one_line_error(fedflat("run", path.name, "--set", f"output.dir={runs}",
                                     cwd=tmp_path))
    assert not runs.exists(), sorted(str(p) for p in runs.rglob("*"))
    return [msg_validate, msg_run]


# ------------------------------------------------------------------------ δ bounds
def test_sample_level_delta_at_or_above_the_ceiling(tmp_path):
    path = scenario(tmp_path, "privacy:\n  sample_level:\n    enabled: true\n"
                    "    noise_multiplier: 1.0\n    delta: 0.5\n")
    msg = one_line_error(fedflat("validate", path.name, cwd=tmp_path))  # no data needed
    assert msg.startswith("error: s.yaml:13: privacy.sample_level.delta:")
    assert "0.5" in msg
    assert "below 0.1" in msg


@pytest.mark.slow
def test_sample_level_delta_against_the_number_of_training_examples(tmp_path):
    from fedflat.runtime.build import build_data
    from fedflat.scenario.loader import load_scenario

    path = scenario(tmp_path, "privacy:\n  sample_level:\n    enabled: true\n"
                    "    noise_multiplier: 1.0\n    delta: 0.05\n")
    n = int(build_data(load_scenario(path).scenario).client_sizes().sum())
    assert 1 / n <= 0.05 < 0.1  # allowed by the ceiling, refused by 1/N
    for msg in refused_by_validate_and_run(tmp_path, path, "--data"):
        assert msg.startswith("error: s.yaml:13: privacy.sample_level.delta:")
        assert f"1/{n}" in msg
        assert "training examples" in msg


def test_user_level_delta_against_the_population(tmp_path):
    path = scenario(tmp_path, "privacy:\n  user_level:\n    enabled: true\n"
                    "    noise_multiplier: 1.0\n    delta: 0.09\n")
    msg = one_line_error(fedflat("validate", path.name, cwd=tmp_path))
    assert msg.startswith("error: s.yaml:13: privacy.user_level.delta:")
    assert "1/12" in msg  # data.num_clients: 12, and 1/12 < 0.09 < 0.1


# ------------------------------------------------------------ impossible budgets
BAD_SAMPLE_BUDGET = "privacy:\n  sample_level:\n    enabled: true\n    epsilon: 0.001\n"


def test_impossible_sample_level_budget_fails_validate_without_data(tmp_path):
    # Below the RDP accountant's floor at δ = 1e-5 (ε ≈ 0.10 with infinite noise): no data
    # is needed to see it.
    path = scenario(tmp_path, BAD_SAMPLE_BUDGET)
    msg = one_line_error(fedflat("validate", path.name, cwd=tmp_path))
    assert msg.startswith("error: s.yaml:12: privacy.sample_level.epsilon:")
    assert "impossible" in msg


@pytest.mark.slow
def test_impossible_sample_level_budget_fails_validate_and_run_up_front(tmp_path):
    path = scenario(tmp_path, BAD_SAMPLE_BUDGET)
    for msg in refused_by_validate_and_run(tmp_path, path, "--data"):
        assert msg.startswith("error: s.yaml:12: privacy.sample_level.epsilon:")
        assert "impossible" in msg


@pytest.mark.slow
def test_impossible_user_level_budget_fails_validate_and_run_up_front(tmp_path):
    path = scenario(tmp_path, "privacy:\n  user_level:\n    enabled: true\n"
                    "    epsilon: 0.05\n")
    for msg in refused_by_validate_and_run(tmp_path, path):
        assert msg.startswith("error: s.yaml:12: privacy.user_level.epsilon:")
        assert "epsilon=0.05" in msg


@pytest.mark.slow
def test_adaptive_clipping_with_a_calibrated_noise_too_large_for_its_count_noise(tmp_path):
    # ε = 0.5 over 2 rounds at q = 1/3 needs z ≈ 3; the default count noise 4/20 = 0.2 needs
    # z < 0.4 (ALGORITHMS.md §4.4).
    path = scenario(tmp_path, "privacy:\n  user_level:\n    enabled: true\n"
                    "    epsilon: 0.5\n    delta: 0.001\n"
                    "    adaptive_clipping: {enabled: true}\n")
    for msg in refused_by_validate_and_run(tmp_path, path):
        assert msg.startswith("error: s.yaml:14: privacy.user_level.adaptive_clipping")
        assert "count_noise" in msg


# ------------------------------------------------------------------ system traces
@pytest.mark.slow
def test_missing_availability_trace_names_the_scenario_line_and_the_path(tmp_path):
    path = scenario(tmp_path, "system:\n  availability: {path: traces/avail.csv}\n")
    for msg in refused_by_validate_and_run(tmp_path, path, "--data"):
        assert msg.startswith("error: s.yaml:10: system.availability.path:")
        assert "traces/avail.csv" in msg
        assert "<scenario>" not in msg


@pytest.mark.slow
def test_malformed_availability_trace_names_the_trace_file_line_and_column(tmp_path):
    (tmp_path / "avail.csv").write_text("client_id,round,available\n0,0,1\n1,zero,1\n")
    path = scenario(tmp_path, "system:\n  availability: {path: avail.csv}\n")
    for msg in refused_by_validate_and_run(tmp_path, path, "--data"):
        assert "avail.csv:3:2: system.availability.path:" in msg
        assert "'zero' is not a number" in msg


def test_malformed_bandwidth_trace_is_refused_by_validate_without_data(tmp_path):
    (tmp_path / "up.csv").write_text("0,1000\n1,-5\n")
    path = scenario(tmp_path, "system:\n  uplink_bandwidth: {kind: trace, path: up.csv}\n")
    msg = one_line_error(fedflat("validate", path.name, cwd=tmp_path))
    assert "up.csv:2:2: system.uplink_bandwidth.path:" in msg
    assert "must be > 0" in msg


# ---------------------------------------------------------------------- data files
MNIST = """\
name: m
data:
  dataset: mnist
  num_clients: 10
  partition: {method: iid}
"""


def _mnist_dir(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    (folder / "mnist.npz").write_bytes(content)
    return folder / "mnist.npz"


def _valid_npz_bytes(tmp_path: Path) -> bytes:
    tmp = tmp_path / "valid.npz"
    z = np.zeros((20, 28, 28), dtype=np.uint8)
    np.savez(tmp, x_train=z, y_train=np.zeros(20, np.uint8), x_test=z,
             y_test=np.zeros(20, np.uint8))
    return tmp.read_bytes()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_npz_is_not_a_valid_data_file_and_never_suggests_pickle(tmp_path, damage):
    content = b"this is not an archive\n" if damage == "garbage" \
        else _valid_npz_bytes(tmp_path)[:1500]
    npz = _mnist_dir(tmp_path, content)
    (tmp_path / "m.yaml").write_text(MNIST)
    msg = one_line_error(fedflat("validate", "--data", "m.yaml", cwd=tmp_path,
                                 FEDFLAT_DATA=str(tmp_path / "data")))
    assert msg.startswith("error: m.yaml:3: data.dataset:")
    assert f"{npz} is not a valid data file" in msg
    assert "pickle" not in msg.lower()


def test_missing_data_file_names_the_path_and_the_environment_variable(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    (tmp_path / "m.yaml").write_text(MNIST)
    msg = one_line_error(fedflat("validate", "--data", "m.yaml", cwd=tmp_path,
                                 FEDFLAT_DATA=str(empty)))
    assert msg.startswith("error: m.yaml:3: data.dataset:")
    assert str(empty / "mnist" / "mnist.npz") in msg
    assert f"FEDFLAT_DATA={empty}" in msg


# ------------------------------------------------------------- method presets
def test_fedsam_with_sample_level_dp_names_the_method_line_and_dp_sam(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("method: fedsam\n" + TINY + "privacy:\n  sample_level:\n"
                    "    enabled: true\n    noise_multiplier: 1.0\n")
    msg = one_line_error(fedflat("validate", path.name, cwd=tmp_path))
    assert msg.startswith("error: s.yaml:1: method:")
    assert "privacy.sample_level.mechanism: dp_sam" in msg


# ---------------------------------------------------------- other entry points
def test_privacy_command_bad_argument_is_one_line(tmp_path):
    msg = one_line_error(fedflat("privacy", "--sampling-rate", "1.5", "--steps", "10",
                                 "--delta", "1e-5", "--noise-multiplier", "1", cwd=tmp_path))
    assert "sampling_rate" in msg


def test_privacy_command_survives_a_corrupt_calibration_cache(tmp_path):
    (tmp_path / "privacy.json").write_text('{"format": 1, "entries": {')  # torn write
    proc = fedflat("privacy", "--sampling-rate", "0.04", "--steps", "100", "--delta", "1e-5",
                   "--epsilon", "3", cwd=tmp_path, FEDFLAT_CACHE_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("noise_multiplier = ")


def test_audit_of_a_missing_scenario_file(tmp_path):
    msg = one_line_error(fedflat("audit", "nope.yaml", cwd=tmp_path))
    assert msg == "error: nope.yaml: scenario file not found"


def test_audit_of_a_scenario_without_dp_names_the_file(tmp_path):
    path = scenario(tmp_path, "")
    msg = one_line_error(fedflat("audit", path.name, cwd=tmp_path))
    assert msg.startswith("error: s.yaml: privacy:")
    assert "no DP mechanism" in msg


@pytest.mark.slow
def test_flower_app_refuses_a_non_empty_folder_and_a_file(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("tomli_w")
    path = scenario(tmp_path, "")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "notes.txt").write_text("mine\n")
    msg = one_line_error(fedflat("flower", "app", path.name, "myapp", cwd=tmp_path))
    assert "myapp exists and is not empty" in msg
    assert (tmp_path / "myapp" / "notes.txt").read_text() == "mine\n"  # untouched
    (tmp_path / "afile").write_text("x")
    msg = one_line_error(fedflat("flower", "app", path.name, "afile", "--force", cwd=tmp_path))
    assert "afile exists and is a file" in msg
