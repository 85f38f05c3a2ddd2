"""A sweep keeps a finished run folder only when it is the run wanted now, made by this code
revision (fedflat.sweep.reuse): otherwise the same command runs it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_scenario

from fedflat._version import code_revision
from fedflat.sweep.reuse import reusable, same_run
from fedflat.sweep.runner import run_sweep
from fedflat.sweep.spec import SweepSpec


def _sweep(tmp_path: Path, **keys) -> SweepSpec:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_scenario(**{"output.plots": False,
                                                    "server.rounds": 2, **keys})))
    return SweepSpec(scenario=str(base), grid={"client.lr": [0.05]}, seeds=[0])


def _stamp(run_dir: Path) -> int:
    return (run_dir / "summary.json").stat().st_mtime_ns


@pytest.mark.slow
def test_other_code_or_an_edited_base_reruns_the_same_folder(tmp_path):
    spec = _sweep(tmp_path)
    (run,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert run.status == "completed"
    first = _stamp(run.run_dir)
    (again,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert _stamp(again.run_dir) == first  # the same code and scenario: kept
    # The run claims another code revision: run again, now with this one.
    summary = run.run_dir / "summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()),
                                   "code_revision": "0" * 40}))
    (third,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert third.status == "completed"
    assert json.loads(summary.read_text())["code_revision"] == code_revision()
    # The base scenario file is edited (more rounds): the folder's run is not that run.
    kept = _stamp(third.run_dir)
    spec = _sweep(tmp_path, **{"server.rounds": 3})
    (fourth,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert _stamp(fourth.run_dir) != kept
    rounds = [json.loads(x)["round"] for x in
              (fourth.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(rounds) == 2  # rounds 0, 1, 2: three training rounds


def test_output_keys_and_the_data_folder_never_split_runs(tmp_path):
    sc = tiny_scenario(**{"output.plots": False})
    run = tmp_path / "run"
    run.mkdir()
    (run / "scenario.yaml").write_text(yaml.safe_dump(sc))
    (run / "summary.json").write_text(json.dumps({"status": "completed",
                                                  "code_revision": code_revision()}))
    assert reusable(run, sc, {"output.plots": True, "output.progress": False})
    assert reusable(run, sc, {"data.data_dir": str(tmp_path / "elsewhere")})
    assert not reusable(run, sc, {"client.lr": 0.0123})
    assert not reusable(run, sc, statuses=("budget_exhausted",))
    (run / "summary.json").unlink()  # killed before it wrote a summary: judged on the scenario
    assert same_run(run, sc)
    assert not reusable(run, sc)
