"""Experiment trackers: TensorBoard scalars and MLflow runs, fed by the driver per round.

One interface (``Tracker``): ``log_round`` with each metrics.jsonl record (and the round's
per-client rows, if any), ``close`` at the end. Both libraries are optional (the pip extra
``tracking``); a scenario that asks for one that is missing is refused before the run starts.
Trackers only mirror what metrics.jsonl holds: the run folder stays the source of truth.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fedflat.scenario.schema import Scenario

TENSORBOARD_DIR = "tensorboard"  # under the run folder
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run id, so that a resumed run continues it
EXTRA = "pip install 'fedflat[tracking]'"
_LIBRARIES = {"output.tensorboard": ("tensorboard", "TensorBoard"),
              "output.mlflow": ("mlflow", "MLflow")}


class Tracker(Protocol):
    def log_round(self, rec: dict[str, Any], rows: Sequence[dict[str, Any]] | None) -> None: ...
    def close(self, status: str) -> None: ...


def wanted(sc: Scenario) -> list[str]:
    """The tracking keys the scenario turns on."""
    out = []
    if sc.output.tensorboard:
        out.append("output.tensorboard")
    if sc.output.mlflow is not None:
        out.append("output.mlflow")
    return out


def missing_libraries(sc: Scenario) -> list[tuple[str, str]]:
    """(key, message) for each tracker the scenario asks for whose library is not installed."""
    problems = []
    for key in wanted(sc):
        module, name = _LIBRARIES[key]
        try:
            importlib.import_module(module)
        except ImportError:
            problems.append((key, f"{name} is not installed ({module}); install the tracking "
                             f"extra: {EXTRA}"))
    return problems


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """The finite numeric values of one metrics record, round excluded (it is the step)."""
    return {k: float(v) for k, v in rec.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b.c": str(value)} (lists as JSON), for MLflow params."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TensorBoardTracker:
    """Scalars under <run>/tensorboard, step = round; per-client accuracy histograms."""

    def __init__(self, run_dir: Path, start_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run drops the events of the rounds it runs again (purge_step).
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR),
                                    purge_step=start_round or None)

    def log_round(self, rec: dict[str, Any], rows: Sequence[dict[str, Any]] | None) -> None:
        step = int(rec["round"])
        for k, v in scalars(rec).items():
            self.writer.add_scalar(k, v, step)
        for key in ("accuracy", "local_accuracy"):
            vals = [r[key] for r in rows or () if r.get(key) is not None and r.get("n")]
            if vals:
                self.writer.add_histogram(f"per_client/{key}", _tensor(vals), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per run folder: params, metrics per round (step = round), the run
    folder's files as artifacts at the end (checkpoints left out)."""

    def __init__(self, sc: Scenario, run_dir: Path) -> None:
        from mlflow.tracking import MlflowClient

        cfg = sc.output.mlflow
        assert cfg is not None  # noqa: S101 - only built when the key is set
        uri = cfg.tracking_uri
        if "://" not in uri and not uri.startswith("file:"):
            # A plain path is MLflow's file store, which MLflow 3 only opens on request.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = str(Path(uri).resolve())
        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.ref = run_dir / MLFLOW_RUN_FILE
        self.uri = uri
        if self.ref.is_file():
            saved = json.loads(self.ref.read_text())
            self.run_id = saved["run_id"]
            # Rounds run again after a resume have the values already logged: not twice.
            self.logged = int(saved.get("logged_round", -2))
            self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else \
            self.client.create_experiment(cfg.experiment)
        run = self.client.create_run(exp_id, run_name=f"{sc.name}/{run_dir.name}",
                                     tags={"fedflat.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        self.logged = -2  # nothing yet: the initial model's line is round -1
        self._save()
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in flatten(sc.model_dump(mode="json")).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log_round(self, rec: dict[str, Any], rows: Sequence[dict[str, Any]] | None) -> None:
        from mlflow.entities import Metric

        step, now = int(rec["round"]), int(time.time() * 1000)
        if step <= self.logged:
            return
        metrics = [Metric(k, v, now, step) for k, v in scalars(rec).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        self.logged = step
        self._save()

    def _save(self) -> None:
        tmp = self.ref.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri,
                                   "logged_round": self.logged}) + "\n")
        os.replace(tmp, self.ref)

    def close(self, status: str) -> None:
        for p in sorted(self.run_dir.iterdir()):
            if p.name == "checkpoints" or p.name.endswith(".tmp"):
                continue
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
            else:
                self.client.log_artifact(self.run_id, str(p))
        done = {"completed": "FINISHED", "budget_exhausted": "FINISHED",
                "interrupted": "KILLED"}.get(status, "FAILED")  # diverged: FAILED
        self.client.set_terminated(self.run_id, status=done)


def open_trackers(sc: Scenario, run_dir: Path, start_round: int) -> list[Tracker]:
    """The trackers the scenario asks for (none by default)."""
    out: list[Tracker] = []
    if sc.output.tensorboard:
        out.append(TensorBoardTracker(run_dir, start_round))
    if sc.output.mlflow is not None:
        out.append(MlflowTracker(sc, run_dir))
    return out


def _tensor(vals: Sequence[float]) -> Any:
    import torch

    return torch.tensor(list(vals), dtype=torch.float64)
