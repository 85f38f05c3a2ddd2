"""output.tensorboard and output.mlflow with the real libraries: the event files and a local
file-store MLflow read back and compared with metrics.jsonl (issue 12)."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import yaml
from conftest import tiny_scenario

import fedflat
from fedflat.cli import main
from fedflat.errors import ScenarioError


def _metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _numeric(metrics):
    """key -> [(round, value)] of every finite number in metrics.jsonl, round excluded."""
    out: dict[str, list[tuple[int, float]]] = {}
    for m in metrics:
        for k, v in m.items():
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                out.setdefault(k, []).append((m["round"], float(v)))
    return out


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0,
                                                                       "histograms": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    sc = tiny_scenario(**{"output.tensorboard": True, "eval.per_client": True,
                          "output.plots": False})
    res = fedflat.run(sc, out=tmp_path / "run")
    acc = _events(res.run_dir)
    expected = _numeric(_metrics(res.run_dir))
    assert "test_accuracy" in expected
    assert "per_client/accuracy_gini" in expected
    assert set(acc.Tags()["scalars"]) == set(expected)
    for key, pairs in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in pairs], key
        for (_, a), (_, b) in zip(got, pairs, strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-6), key  # stored as float32
    hist = acc.Histograms("per_client/accuracy")
    assert [h.step for h in hist] == [1, 3]
    assert all(h.histogram_value.num == 12 for h in hist)  # every client


def test_resumed_tensorboard_has_one_value_per_round(tmp_path):
    pytest.importorskip("tensorboard")
    sc = tiny_scenario(**{"output.tensorboard": True, "output.plots": False})
    full = fedflat.run(sc, out=tmp_path / "full").run_dir
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "final_model.pt").unlink()
    (cut / "checkpoints" / "round_000004.pt").unlink()  # the last round runs again
    fedflat.resume(cut)
    a, b = _events(full), _events(cut)
    for key in ("update_norm", "test_accuracy", "bytes_up_total"):
        assert [(e.step, e.value) for e in a.Scalars(key)] == \
            [(e.step, e.value) for e in b.Scalars(key)]


def test_mlflow_file_store_holds_params_metrics_and_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    sc = tiny_scenario(**{"output.mlflow": {"tracking_uri": str(store), "experiment": "t12"},
                          "output.plots": False})
    res = fedflat.run(sc, out=tmp_path / "run")
    client = MlflowClient(tracking_uri=str(store))
    exp = client.get_experiment_by_name("t12")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    resolved = yaml.safe_load((res.run_dir / "scenario.yaml").read_text())
    assert run.data.params["client.lr"] == str(resolved["client"]["lr"])
    assert run.data.params["server.rounds"] == "4"
    assert run.data.params["data.synthetic.max_size"] == "120"
    expected = _numeric(_metrics(res.run_dir))
    assert set(run.data.metrics) == set(expected)
    for key in ("test_accuracy", "update_norm", "bytes_up_total", "wall_seconds"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in hist] == [s for s, _ in expected[key]]
        for (_, a), (_, b) in zip(hist, expected[key], strict=True):
            assert a == pytest.approx(b, rel=1e-12)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "summary.json", "scenario.yaml", "final_model.pt"} <= names
    assert "checkpoints" not in names


def test_resumed_mlflow_run_continues_without_duplicates(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    sc = tiny_scenario(**{"output.mlflow": {"tracking_uri": str(store), "experiment": "r"},
                          "output.plots": False})
    full = fedflat.run(sc, out=tmp_path / "full").run_dir
    run_id = json.loads((full / "mlflow_run.json").read_text())["run_id"]
    # Killed after round 3 reached MLflow but before its checkpoint: round 3 runs again.
    (full / "final_model.pt").unlink()
    (full / "checkpoints" / "round_000004.pt").unlink()
    fedflat.resume(full)
    client = MlflowClient(tracking_uri=str(store))
    assert len(client.search_runs([client.get_experiment_by_name("r").experiment_id])) == 1
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "update_norm"))
    # once each (the initial model's line, round -1, has no update)
    assert hist == [(m["round"], m["update_norm"]) for m in _metrics(full) if m["round"] >= 0]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_missing_library_is_one_clear_error_before_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    sc = tiny_scenario(**{"output.mlflow": {"tracking_uri": str(tmp_path / "ml")}})
    with pytest.raises(ScenarioError, match=r"fedflat\[tracking\]") as exc:
        fedflat.run(sc, out=tmp_path / "run")
    assert exc.value.key == "output.mlflow"
    assert not (tmp_path / "run").exists()
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sc))
    assert main(["run", str(path), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "s.yaml" in err[0]
    assert "output.mlflow" in err[0]
    assert "fedflat[tracking]" in err[0]
    assert not (tmp_path / "run2").exists()
