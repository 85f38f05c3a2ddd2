"""fedflat.sweep.cells: a table cell is one scenario over seeds, run as a sweep."""

from __future__ import annotations

import pytest
from conftest import tiny_scenario

from fedflat.scenario.loader import load_scenario
from fedflat.sweep.cells import CellJob, cell_spec, run_cells, validate_cells
from fedflat.sweep.reuse import comparable
from fedflat.sweep.spec import expand_points, run_overrides


def _resolved(source, over) -> dict:
    return comparable(load_scenario(source, over).scenario.model_dump(mode="json"))


def test_a_cells_sweep_resolves_to_base_plus_overrides_for_every_seed(tmp_path):
    """What each run of the cell's sweep loads equals load_scenario(base, over) with its seed:
    the preset in the base expands first and the dotted keys win over it; the runtime and
    plots keys the cell sets survive the sweep's forced ones."""
    base = {**tiny_scenario(), "method": "fedsam"}
    over = {"client.oracle.rho": 0.02, "server.rounds": 3, "runtime.backend": "serial",
            "output.plots": True, "output.progress": False}
    job = CellJob(("x",), base, over, tmp_path / "cell", (0, 5))
    spec = cell_spec(job)
    (point,) = expand_points(spec)
    for seed in job.seeds:
        got = load_scenario(spec.scenario, run_overrides(spec, point, seed)).scenario
        want = load_scenario(base, {**over, "seed": seed}).scenario
        assert got.model_dump(mode="json") == want.model_dump(mode="json")
        assert got.client.oracle.rho == pytest.approx(0.02)
        assert got.client.oracle.name == "sam"
        assert got.output.plots is True
        assert got.seed == seed


def test_validate_cells_names_the_bad_key_before_anything_runs(tmp_path):
    good = CellJob(("a",), tiny_scenario(), {}, tmp_path / "a", (0,))
    bad = CellJob(("b",), tiny_scenario(), {"client.lrr": 0.1}, tmp_path / "b", (0,))
    assert validate_cells([good]) is None
    message = validate_cells([good, bad])
    assert message is not None
    assert "client.lrr" in message
    assert not (tmp_path / "b").exists()  # nothing was written for it


@pytest.mark.slow
def test_cells_run_resume_and_rerun_what_changed(tmp_path):
    sc = tiny_scenario(**{"server.rounds": 2, "output.plots": False})
    jobs = [CellJob(("lr", lr), sc, {"client.lr": lr}, tmp_path / f"c{k}", (0, 1))
            for k, lr in enumerate((0.05, 0.1))]
    first = run_cells(jobs, parallel=2, log=lambda _: None)
    assert [len(o.finished) for o in first] == [2, 2]
    assert [o.reused for o in first] == [0, 0]
    assert not any(o.problems for o in first)
    for o in first:  # each run is of its cell's scenario and seed
        for run in o.finished_runs:
            want = _resolved(o.job.base, {**o.job.over, "seed": run.seed})
            got = _resolved(run.run_dir / "scenario.yaml", None)
            assert got == want
    again = run_cells(jobs, log=lambda _: None)
    assert [o.reused for o in again] == [2, 2]
    # Another value in one cell (a --set of a script): that cell runs again, in place.
    changed = [jobs[0], CellJob(jobs[1].key, sc, {"client.lr": 0.2}, jobs[1].folder, (0, 1))]
    third = run_cells(changed, log=lambda _: None)
    assert [o.reused for o in third] == [2, 0]
    assert [len(o.finished) for o in third] == [2, 2]
    lr = load_scenario(third[1].finished[0] / "scenario.yaml").scenario.client.lr
    assert lr == pytest.approx(0.2)


def test_inline_runs_equal_the_runs_made_directly(tmp_path):
    """InlineLauncher: the sweep's own command in this process gives the metrics of the same
    run made with fedflat.run (clock keys aside), and a rerun keeps it."""
    import json

    import yaml

    import fedflat
    from fedflat.sweep.runner import run_sweep
    from fedflat.sweep.spec import SweepSpec

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(tiny_scenario(**{"server.rounds": 2,
                                                    "output.plots": False})))
    spec = SweepSpec(scenario=str(base), grid={"client.lr": [0.05]}, seeds=[0], inline=True)
    (run,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert run.status == "completed"
    direct = fedflat.run(str(base), overrides=run_overrides(spec, run.point, run.seed),
                         out=tmp_path / "direct")
    got = [m for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()
           if (m := json.loads(x))["round"] >= 0]
    clock = {"wall_seconds", "round_seconds"}
    assert len(got) == len(direct.metrics) == 2
    for a, b in zip(got, direct.metrics, strict=True):
        assert {k: v for k, v in a.items() if k not in clock} == \
            {k: v for k, v in b.items() if k not in clock}
    (again,) = run_sweep(spec, tmp_path / "sw", echo=lambda _: None)
    assert again.reused
