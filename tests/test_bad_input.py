"""Bad scenario and trace files: one located line, exit 2, no traceback (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedflat.comm.system import client_profiles
from fedflat.errors import FedflatError

CASES = {
    "binary.yaml": (b"name: x\n\xff\xfe\x00garbage", "not UTF-8 text"),
    "latin1.yaml": ("name: caf\xe9\n".encode("latin-1"), "byte offset"),
    "empty.yaml": (b"", "empty scenario"),
    "comments.yaml": (b"# only a comment\n", "empty scenario"),
    "null.yaml": (b"null\n", "empty scenario"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_unreadable_or_empty_scenario_is_refused(tmp_path, name):
    data, expected = CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert name in lines[0]
    assert expected in lines[0]


def test_empty_mapping_means_every_default(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-m", "fedflat.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


TRACES = {
    "letters.csv": ("0,1000\n1,abc\n", ":2:2:", "is not a number"),
    "negative.csv": ("0,-3\n", ":1:2:", "must be > 0"),
    "short.csv": ("0\n", ":1:", "expected 2 columns"),
    "blank.csv": ("", "", "empty trace"),
}


@pytest.mark.parametrize("name", sorted(TRACES))
def test_bad_bandwidth_trace_names_file_line_and_column(tmp_path, name):
    from fedflat.rng import numpy_rng
    from fedflat.scenario.system import SystemConfig

    text, where, expected = TRACES[name]
    (tmp_path / name).write_text(text)
    cfg = SystemConfig(uplink_bandwidth={"kind": "trace", "path": name})
    with pytest.raises(FedflatError) as info:
        client_profiles(2, cfg, numpy_rng(0, "system"), base_dir=tmp_path)
    msg = str(info.value)
    assert f"{name}{where}" in msg
    assert expected in msg
    assert "system.uplink_bandwidth" in msg
