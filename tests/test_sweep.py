"""fedflat sweep: grid expansion, validation before running, the table against hand
aggregation, the t interval against scipy and a t table, kill -9 + rerun == uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_scenario

import fedflat
from fedflat.cli import main
from fedflat.errors import ScenarioError
from fedflat.runtime.checkpoint import list_checkpoints
from fedflat.sweep.results import mean_sd, t_interval, write_tables
from fedflat.sweep.runner import plan, write_index
from fedflat.sweep.spec import SweepSpec, expand_points, load_sweep_file, run_overrides, validate


def _write(path: Path, sc: dict) -> Path:
    path.write_text(yaml.safe_dump(sc))
    return path


# ---------------------------------------------------------------------------- grid
def test_grid_is_the_product_and_zip_varies_keys_together():
    spec = SweepSpec(scenario="x.yaml",
                     grid={"method": ["fedavg", "fedsam"], "client.lr": [0.1, 0.01, 0.001],
                           "client.oracle.rho": [0.0, 0.05]},
                     zip=[["method", "client.oracle.rho"]])
    points = expand_points(spec)
    assert [p.overrides for p in points] == [
        {"method": m, "client.oracle.rho": r, "client.lr": lr}
        for m, r in (("fedavg", 0.0), ("fedsam", 0.05)) for lr in (0.1, 0.01, 0.001)]
    assert len(expand_points(SweepSpec(scenario="x", grid=spec.grid))) == 2 * 3 * 2


def test_zip_of_unequal_lengths_is_an_error():
    spec = SweepSpec(scenario="x", grid={"a": [1, 2], "b": [1]}, zip=[["a", "b"]])
    with pytest.raises(ScenarioError, match="one length"):
        expand_points(spec)


def test_sweep_file_reads_relative_scenario_and_locates_bad_keys(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "s.yaml"
    f.write_text("scenario: ../base.yaml\ngrid:\n  client.lr: [0.1, 0.2]\n  method: [fedavg]\n"
                 "seeds: [4, 9]\njobs: 2\n")
    spec = load_sweep_file(f)
    assert Path(spec.scenario) == tmp_path / "sub" / ".." / "base.yaml"
    assert spec.seeds == [4, 9]
    assert spec.jobs == 2
    assert spec.grid == {"client.lr": [0.1, 0.2], "method": ["fedavg"]}
    f.write_text("scenario: base.yaml\ngrid: {a: [1]}\nsedes: 3\n")
    with pytest.raises(ScenarioError) as exc:
        load_sweep_file(f)
    assert exc.value.line == 3
    assert exc.value.key == "sedes"


def test_every_point_is_validated_before_any_runs(tmp_path, capsys):
    base = _write(tmp_path / "base.yaml", tiny_scenario())
    out = tmp_path / "sw"
    rc = main(["sweep", str(base), "--grid", "client.lr=0.1,-1", "--seeds", "2",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "sweep point 1 (client.lr=-1), seed 0" in err
    assert "--grid client.lr" in err
    assert not out.exists(), "an invalid sweep must write nothing"


def test_points_run_serial_unless_the_user_chose_a_backend(tmp_path):
    base = _write(tmp_path / "base.yaml", tiny_scenario(**{"runtime.backend": "ray"}))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.1]})
    (loaded,) = validate(spec, expand_points(spec))
    assert loaded.scenario.runtime.backend == "serial"
    spec.sets = ["runtime.backend=ray"]
    (loaded,) = validate(spec, expand_points(spec))
    assert loaded.scenario.runtime.backend == "ray"


# ---------------------------------------------------------------------------- statistics
def test_mean_sd_cell_by_hand():
    # mean 0.6, sample sd √((0.01 + 0.01)/1) = 0.1414 → ×100
    assert mean_sd([0.5, 0.7], 100) == "60.0 ± 14.1"
    assert mean_sd([0.123], 100) == "12.3"
    assert mean_sd([1.0, 2.0, 3.0], digits=3) == "2.000 ± 1.000"


def test_t_interval_matches_scipy_and_the_t_table():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = [0.61, 0.64, 0.58, 0.66, 0.60]
    s = t_interval(x)
    mean, sd = statistics.mean(x), statistics.stdev(x)
    lo, hi = scipy_stats.t.interval(0.95, len(x) - 1, loc=mean, scale=sd / len(x) ** 0.5)
    assert s.mean == pytest.approx(mean, rel=1e-12)
    assert s.std == pytest.approx(sd, rel=1e-12)
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    # Published two-sided 95 % critical value for 4 degrees of freedom: 2.776.
    assert (s.ci_high - mean) / (sd / 5 ** 0.5) == pytest.approx(2.776, abs=5e-4)
    one = t_interval([0.5])
    assert (one.n, one.mean, one.std, one.ci_low) == (1, 0.5, None, None)


def test_table_equals_the_runs_aggregated_by_hand(tmp_path):
    base = _write(tmp_path / "base.yaml", tiny_scenario(**{"output.plots": False}))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.05, 0.2]}, seeds=[0, 1, 2])
    folder = tmp_path / "sw"
    runs = plan(spec, folder)
    for r in runs:  # the runs themselves, in-process (the runner is tested below)
        fedflat.run(str(base), overrides=run_overrides(spec, r.point, r.seed), out=r.run_dir)
    write_index(spec, folder, runs)
    target = 0.3
    write_tables(folder, target)
    table = json.loads((folder / "results.json").read_text())["points"]
    t_975_df2 = 4.302652729911275  # t table, 2 degrees of freedom
    for entry, point in zip(table, expand_points(spec), strict=True):
        finals, bests, ups, hits = [], [], [], []
        for seed in spec.seeds:
            lines = (folder / "runs" / point.folder(seed) / "metrics.jsonl").read_text()
            # the training rounds: the first line evaluates the initial model (round -1)
            recs = [m for m in map(json.loads, lines.splitlines()) if m["round"] >= 0]
            accs = [m["test_accuracy"] for m in recs if m.get("test_accuracy") is not None]
            finals.append(accs[-1])
            bests.append(max(accs))
            ups.append(sum(m["bytes_up"] for m in recs))
            hit = [m["round"] + 1 for m in recs if (m.get("test_accuracy") or 0) >= target]
            if hit:
                hits.append(hit[0])
        for key, vals in (("final_accuracy", finals), ("best_accuracy", bests),
                          ("uplink_bytes", ups)):
            mean, sd = statistics.mean(vals), statistics.stdev(vals)
            got = entry[key]
            assert got["n"] == 3
            assert got["mean"] == pytest.approx(mean, rel=1e-12)
            assert got["std"] == pytest.approx(sd, rel=1e-9, abs=1e-12)
            assert got["ci_high"] == pytest.approx(mean + t_975_df2 * sd / 3 ** 0.5, rel=1e-9)
        assert entry["rounds_to_target"]["n"] == len(hits)
        if hits:
            assert entry["rounds_to_target"]["mean"] == pytest.approx(statistics.mean(hits))
    md = (folder / "results.md").read_text()
    assert "client.lr=0.05" in md
    assert "client.lr=0.2" in md


# ---------------------------------------------------------------------------- kill -9
def _sweep_cmd(base: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fedflat.cli", "sweep", str(base), "--grid",
            "client.lr=0.02,0.05", "--seeds", "1", "--jobs", "2", "--out", str(out),
            "--target", "0.3", "--no-plots"]


def _env() -> dict[str, str]:
    root = str(Path(fedflat.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": root, "PYTHONUNBUFFERED": "1"}


def _children_of(out: Path) -> list[int]:
    """Live processes whose command line names the sweep folder."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if str(out) in cmd and state != "Z":
                pids.append(int(d.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_sweep_then_rerun_equals_uninterrupted(tmp_path):
    sc = tiny_scenario(**{"server.rounds": 12, "client.local_epochs": 3,
                          "data.synthetic.max_size": 300, "eval.every": 4})
    base = _write(tmp_path / "base.yaml", sc)
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run(_sweep_cmd(base, ref), env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(_sweep_cmd(base, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline:  # wait for a run's third checkpoint
        if any(int(p.stem.split("_")[1]) >= 3 for d in (out / "runs").glob("*")
               for p in list_checkpoints(d)):
            break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    else:
        pytest.fail("no checkpoint appeared")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while _children_of(out) and time.time() < deadline:
        time.sleep(0.05)
    assert not _children_of(out), "the runs must die with the sweep"
    statuses = [json.loads((d / "summary.json").read_text())["status"]
                for d in (out / "runs").glob("*") if (d / "summary.json").exists()]
    assert "running" in statuses, "a killed sweep must leave unfinished runs"
    again = subprocess.run(_sweep_cmd(base, out), env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "resumed from round" in again.stdout, again.stdout
    got = json.loads((out / "results.json").read_text())
    assert got == json.loads((ref / "results.json").read_text())
    assert (out / "results.md").read_text() == (ref / "results.md").read_text()
    # A third time: everything is finished, nothing runs, the table stays.
    third = subprocess.run(_sweep_cmd(base, out), env=_env(), capture_output=True, text=True,
                           timeout=120)
    assert "2 already finished" in third.stdout
    assert json.loads((out / "results.json").read_text()) == got


# ---------------------------------------------------------------------------- --ray
@pytest.mark.slow
@pytest.mark.ray
def test_ray_dispatch_equals_the_runs_made_directly(tmp_path, ray_session):
    from fedflat.sweep.runner import run_sweep

    base = _write(tmp_path / "base.yaml", tiny_scenario(**{"output.plots": False}))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.05, 0.2]}, seeds=[0], jobs=2,
                     ray=True)
    runs = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert [r.status for r in runs] == ["completed", "completed"]
    for r in runs:  # the same command in this process: the same metrics, bit for bit
        direct = fedflat.run(str(base), overrides=run_overrides(spec, r.point, r.seed),
                             out=tmp_path / "direct" / r.name)
        got = [m for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()
               if (m := json.loads(x))["round"] >= 0]  # training rounds, as RunResult.metrics
        clock = {"wall_seconds", "round_seconds"}
        for a, b in zip(got, direct.metrics, strict=True):
            assert {k: v for k, v in a.items() if k not in clock} == \
                {k: v for k, v in b.items() if k not in clock}
    # A rerun finds every run finished and starts nothing (no Ray task either).
    again = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert [r.status for r in again] == ["completed", "completed"]


def test_diverged_runs_are_final_and_reported_not_averaged(tmp_path):
    from fedflat.sweep.runner import run_sweep

    base = _write(tmp_path / "base.yaml", tiny_scenario(**{"output.plots": False}))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.05, 1e6]}, seeds=[0])
    runs = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert [r.status for r in runs] == ["completed", "diverged"]
    paths = write_tables(tmp_path / "sw")
    points = json.loads(paths["json"].read_text())["points"]
    assert [p["seeds"] for p in points] == [[0], []]
    assert points[1]["seeds_diverged"] == [0]
    assert points[1]["final_accuracy"]["mean"] is None  # nothing averaged in
    assert "0/1 (1 diverged)" in paths["md"].read_text()
    # A rerun starts nothing: a diverged run would diverge again.
    stamp = (runs[1].run_dir / "summary.json").stat().st_mtime_ns
    again = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert [r.status for r in again] == ["completed", "diverged"]
    assert (runs[1].run_dir / "summary.json").stat().st_mtime_ns == stamp


def test_runs_record_their_code_revision_and_a_mixed_table_says_so(tmp_path):
    base = _write(tmp_path / "base.yaml", tiny_scenario(**{"output.plots": False,
                                                           "server.rounds": 2}))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.05, 0.2]}, seeds=[0])
    folder = tmp_path / "sw"
    runs = plan(spec, folder)
    for r in runs:
        fedflat.run(str(base), overrides=run_overrides(spec, r.point, r.seed), out=r.run_dir)
    write_index(spec, folder, runs)
    head = subprocess.run(["git", "-C", str(Path(fedflat.__file__).parents[1]), "rev-parse",
                           "HEAD"], capture_output=True, text=True).stdout.strip()
    recorded = json.loads((runs[0].run_dir / "summary.json").read_text())["code_revision"]
    if head:  # a git checkout (CI's fresh clone is one): the commit, maybe marked -dirty
        assert recorded.removesuffix("-dirty") == head
    paths = write_tables(folder)
    assert "WARNING" not in paths["md"].read_text()
    # One run made by other code: the table says it mixes revisions.
    summary = runs[1].run_dir / "summary.json"
    info = json.loads(summary.read_text())
    summary.write_text(json.dumps({**info, "code_revision": "0" * 40}))
    paths = write_tables(folder)
    assert "WARNING: the runs come from 2 code revisions" in paths["md"].read_text()
    assert len(json.loads(paths["json"].read_text())["code_revisions"]) == 2


def test_sweep_file_ray_key(tmp_path):
    base = _write(tmp_path / "base.yaml", tiny_scenario())
    (tmp_path / "s.yaml").write_text(f"scenario: {base.name}\ngrid: {{client.lr: [0.1]}}\n"
                                     "ray: true\n")
    assert load_sweep_file(str(tmp_path / "s.yaml")).ray is True
    (tmp_path / "bad.yaml").write_text(f"scenario: {base.name}\nray: 3\n")
    with pytest.raises(ScenarioError, match="true or false"):
        load_sweep_file(str(tmp_path / "bad.yaml"))
