"""The driver of a run: rounds, metrics, checkpoints, progress, divergence.

It samples cohorts, hands jobs to a backend, writes the initial model's metrics line and one
per round, checkpoints, and stops a run whose loss explodes. It decides no numbers itself
beyond which clients take part. The entry points (``run``, ``resume``) and the choice of
driver for a scenario live in :mod:`fedflat.runtime.run`; other drivers (gossip,
personalization) subclass :class:`Runner` from here.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fedflat._version import __version__, code_revision
from fedflat.comm.asynchronous import (
    AsyncState,
    next_buffer,
    scheduler_from_config,
    staleness_weights,
    start,
    versions_in_use,
)
from fedflat.data.datasets import DATA_ENV
from fedflat.errors import BudgetExhausted, DataError, FedflatError, ScenarioError
from fedflat.privacy.plan import resolve_privacy
from fedflat.report.tables import INITIAL_ROUND
from fedflat.rng import numpy_rng
from fedflat.runtime.backends import make_backend
from fedflat.runtime.build import (
    FederatedData,
    build_data,
    build_flat_model,
    build_schedule,
    client_lr,
    initial_params,
)
from fedflat.runtime.checkpoint import list_checkpoints, save_checkpoint
from fedflat.runtime.round_loop import Backend
from fedflat.runtime.sampling import sample_cohort
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.shared_data import client_stats_or_file
from fedflat.runtime.timeline import Timeline
from fedflat.runtime.worker import ClientJob
from fedflat.scenario.loader import LoadedScenario, dump_scenario
from fedflat.scenario.schema import Scenario

#: Exit code of ``fedflat run`` / ``resume`` for a run that ended with status ``diverged``
#: (2 is bad input, 130 an interrupt).
EXIT_DIVERGED = 3


@dataclass
class RunResult:
    """What ``fedflat.run`` returns.

    ``metrics`` holds one record per training round (metrics.jsonl without its first line);
    ``initial`` is that first line, the evaluation of the initial model (``round`` -1),
    empty for a run resumed from a checkpoint written before it existed.
    """

    params: torch.Tensor
    metrics: list[dict[str, Any]]
    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    # The global BatchNorm running statistics (model.norm batch, bn_aggregation average;
    # also in final_buffers.pt), empty otherwise.
    buffers: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    initial: dict[str, Any] = field(default_factory=dict)


class Diverged(Exception):
    """A round's loss is non-finite or exploded (``runtime.divergence_factor``)."""


def load_data(loaded: LoadedScenario) -> FederatedData:
    """Build the federated data, turning data problems into located scenario errors."""
    try:
        return build_data(loaded.scenario)
    except DataError as exc:
        key = exc.key or "data.dataset"
        if key == "data.data_dir" and ("data", "data_dir") not in loaded.lines:
            # data_dir came from FEDFLAT_DATA or is unset: point at the dataset line.
            env = os.environ.get(DATA_ENV)
            source = f" [data.data_dir is not set: {DATA_ENV}={env}]" \
                if env and loaded.scenario.data.data_dir == env else ""
            raise loaded.error("data.dataset", f"{exc}{source}") from None
        raise loaded.error(key, str(exc)) from None


def new_run_dir(sc: Scenario, out: str | Path | None) -> Path:
    if out is not None:
        path = Path(out)
        if path.exists() and any(path.iterdir()):
            raise ScenarioError(f"output folder {path} exists and is not empty", file="--out")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(sc.output.dir) / sc.name
    path, i = base / stamp, 1
    while path.exists():
        path, i = base / f"{stamp}-{i}", i + 1
    path.mkdir(parents=True)
    return path


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def _clean(rec: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe record: NaN becomes null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in rec.items()}


class Runner:
    """Runs (or resumes) one scenario in one run folder."""

    def __init__(self, loaded: LoadedScenario, run_dir: Path, fed: FederatedData) -> None:
        self.loaded = loaded
        self.sc = loaded.scenario
        self.run_dir = run_dir
        self.fed = fed
        self.metrics: list[dict[str, Any]] = []
        self.initial: dict[str, Any] = {}  # the round -1 record (initial model), once evaluated
        self.next_round = 0
        self.elapsed_before = 0.0
        self._between_rounds = True
        self.async_state: AsyncState | None = None
        self.privacy_state: dict[str, Any] | None = None
        self.base_dir = Path(loaded.file).parent if Path(loaded.file).is_file() else None
        self.trackers: list[Any] = []  # output.tensorboard / output.mlflow

    # ------------------------------------------------------------------ files
    def write_static_files(self) -> None:
        (self.run_dir / "scenario.yaml").write_text(dump_scenario(self.sc))
        ds = self.fed.dataset
        if self.fed.source is not None:
            # On-demand devices: a summary, and the sizes as one binary file (a per-client
            # JSON list of 10^6 class histograms was 234 MB and needs every device generated).
            sizes = self.fed.client_sizes()
            np.save(self.run_dir / "client_sizes.npy", sizes.astype(np.int32))
            write_json(self.run_dir / "clients.json",
                        {"dataset": ds.name, "num_clients": self.fed.num_clients,
                         "on_demand": True, "sizes_file": "client_sizes.npy",
                         "train_samples": {"total": int(sizes.sum()), "min": int(sizes.min()),
                                           "mean": float(sizes.mean()),
                                           "max": int(sizes.max())}})
            return
        stats = client_stats_or_file(self.run_dir, self.fed.client_indices, ds.y_train.numpy(),
                                     ds.num_classes)  # above 10⁴ clients: a binary file
        info: dict[str, Any] = {"dataset": ds.name, "num_clients": self.fed.num_clients,
                                "clients": stats}
        if self.fed.client_test is not None:  # which test split per-client figures are on
            info["client_test"] = self.fed.client_test.describe()
        write_json(self.run_dir / "clients.json", info)

    def write_summary(self, status: str, **extra: Any) -> dict[str, Any]:
        accs = [m["test_accuracy"] for m in self.metrics if m.get("test_accuracy") is not None]
        summary = {
            "status": status,
            "name": self.sc.name,
            "rounds_planned": self.sc.server.rounds,
            "rounds_completed": self.next_round,
            "final_test_accuracy": accs[-1] if accs else None,
            "best_test_accuracy": max(accs) if accs else None,
            "final_test_loss": next((m["test_loss"] for m in reversed(self.metrics)
                                     if m.get("test_loss") is not None), None),
            "wall_seconds": self.elapsed_before
            + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            "fedflat_version": __version__,
            "code_revision": code_revision(),
            **extra,
        }
        write_json(self.run_dir / "summary.json", summary)
        return summary

    def _rewrite_metrics(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        rows = ([self.initial] if self.initial else []) + self.metrics
        tmp.write_text("".join(json.dumps(_clean(m), default=_json_default) + "\n"
                               for m in rows))
        os.replace(tmp, path)
        # eval.per_client rows past the checkpoint are rewritten by the resumed rounds.
        rows = self.run_dir / "per_client.jsonl"
        if rows.exists():
            keep = []
            for ln in rows.read_text().splitlines():
                try:
                    if json.loads(ln)["round"] < self.next_round:
                        keep.append(ln + "\n")
                except ValueError:  # a line cut short by a kill
                    continue
            rows.with_suffix(".jsonl.tmp").write_text("".join(keep))
            os.replace(rows.with_suffix(".jsonl.tmp"), rows)

    # ------------------------------------------------------------------ loop
    def execute(self, backend_state: dict[str, Any] | None = None,
                make_backend: Callable[..., Backend] = make_backend) -> RunResult:
        """Run the remaining rounds; ``make_backend`` lets other front ends (Flower) supply
        their own backend with the same driver, files and checkpoints."""
        sc = self.sc
        self._t0 = time.perf_counter()  # the reported time includes the backend's start-up
        model = build_flat_model(sc, self.fed.dataset)
        params0 = initial_params(sc, model)
        self.num_params = model.num_params
        try:
            self.plan = resolve_privacy(sc, self.fed.client_sizes(), build_schedule(sc),
                                        num_tensors=len(model.segments))
        except ValueError as exc:  # an impossible budget
            raise self.loaded.error("privacy", str(exc)) from None
        if self.privacy_state is not None:
            self.plan.load_state_dict(self.privacy_state)
        self.rsc = self.plan.scenario  # the scenario with calibrated noise, for the workers
        try:
            backend = make_backend(self.rsc, self.fed, params0)
        except ScenarioError as exc:  # e.g. a cluster too small for the actors asked for
            if exc.key and exc.file is None:
                exc = self.loaded.error(exc.key, exc.message)
            self.write_summary("failed", error=str(exc))
            raise exc from None
        status = "failed"
        extra: dict[str, Any] = {}
        try:
            if backend_state is not None:
                try:
                    backend.load_state_dict(backend_state)
                except ValueError as exc:  # a checkpoint of another scenario or version
                    raise FedflatError(f"{self.run_dir}: the checkpoint does not fit the "
                                       f"run's scenario: {exc}") from None
            if self.next_round == 0 and not self.initial:
                self.initial = self._initial_record(backend, params0)
            self._rewrite_metrics()
            self._open_trackers()
            if self.next_round == 0 and self.initial:
                for tracker in self.trackers:  # the initial model's line, step -1 as in the file
                    tracker.log_round(self.initial, None)
            status = self._loop(backend)
        except Diverged as exc:
            status = "diverged"
            extra["diverged"] = str(exc)
            kept = list_checkpoints(self.run_dir)
            print(f"diverged: {exc}; " + (f"the last checkpoint before it is kept: {kept[-1]}"
                                          if kept else "no checkpoint was written before it"),
                  file=sys.stderr)
        except BudgetExhausted as exc:
            status = "budget_exhausted"
            extra["stopped"] = str(exc)
            print(f"stopped: {exc}", file=sys.stderr)
            self._checkpoint(backend)
        except KeyboardInterrupt:
            status = "interrupted"
            if self._between_rounds:  # a second Ctrl-C mid-round: keep the last checkpoint
                self._checkpoint(backend)
            raise
        except BaseException as exc:
            extra["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                params = backend.final_params()
                buffers = backend.final_buffers()
                if status in ("completed", "budget_exhausted"):
                    torch.save(params, self.run_dir / "final_model.pt")
                    if buffers.numel():
                        torch.save(buffers, self.run_dir / "final_buffers.pt")
                if self.rsc.privacy.enabled:
                    write_json(self.run_dir / "privacy.json",
                                self.plan.summary(self.fed.num_clients))
                extra.update(backend.describe())  # Ray: where the actors ran, actors lost
                summary = self.write_summary(status, **extra)
                if self.sc.output.plots:
                    self._plots()
                for tracker in self.trackers:  # last: the artifacts include the plots
                    tracker.close(status)
            finally:
                backend.close()
        return RunResult(params=params, metrics=self.metrics, run_dir=self.run_dir, summary=summary,
                         buffers=buffers, initial=self.initial)

    def _initial_record(self, backend: Any, params0: torch.Tensor) -> dict[str, Any]:
        """The evaluation of the initial model (the metrics line before round 0)."""
        # Serial, vmap and Flower hold their ServerCore here; Ray's lives in an actor, so the
        # driver evaluates a ServerCore of its own built from the same initial parameters.
        core = getattr(backend, "core", None)
        if core is None:
            core = ServerCore(self.rsc, self.fed, params0, threads=self.sc.runtime.threads)
        rec: dict[str, Any] = {"round": INITIAL_ROUND, **core.evaluate()}
        rec["wall_seconds"] = self.elapsed_before + time.perf_counter() - self._t0
        return rec

    def _plots(self) -> None:
        """The run's own plots (plots/*.png); plotting never fails a run."""
        try:
            from fedflat.report.plots import plot_run

            plot_run(self.run_dir)
        except Exception as exc:
            warnings.warn(f"could not draw the run's plots: {exc}", stacklevel=2)

    def _open_trackers(self) -> None:
        if self.sc.output.tensorboard or self.sc.output.mlflow is not None:
            from fedflat.report.tracking import open_trackers

            self.trackers = open_trackers(self.sc, self.run_dir, self.next_round)

    def _checkpoint(self, backend: Backend) -> None:
        state = {"server": backend.state_dict(), "metrics": self.metrics,
                 "privacy": self.plan.state_dict(),
                 "async_state": self.async_state.to_dict() if self.async_state else None,
                 "initial": self.initial,
                 "scenario": computed_keys(self.sc),
                 "wall_seconds": self.elapsed_before + time.perf_counter() - self._t0}
        save_checkpoint(self.run_dir, self.next_round, state, self.sc.output.keep_checkpoints)

    def _loop(self, backend: Backend) -> str:
        """Run the remaining rounds. The first Ctrl-C stops at the next round boundary
        (so the checkpoint is consistent); a second one stops at once."""
        stop = {"requested": False}

        def on_sigint(signum: int, frame: Any) -> None:
            if stop["requested"]:
                raise KeyboardInterrupt
            stop["requested"] = True

        in_main = threading.current_thread() is threading.main_thread()
        # SIGTERM (a scheduler's stop) is treated like Ctrl-C: checkpoint at the boundary.
        previous = {sig: signal.signal(sig, on_sigint) for sig in (signal.SIGINT, signal.SIGTERM)} \
            if in_main else {}
        try:
            return self._rounds(backend, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _rounds(self, backend: Backend, stop: dict[str, bool]) -> str:
        """The round loop. Round t+1 is planned (cohort, stragglers, budgets) while round t
        is current; planning is pure and commits nothing until the round starts."""
        sc = self.sc
        progress = Progress(sc, self.next_round)
        timeline = Timeline(self.rsc, self.fed, self.num_params, self.base_dir)
        sched = scheduler_from_config(sc.system) if sc.system.asynchronous is not None else None
        job_times = timeline.job_times() if sched is not None else None
        metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - kept open for the loop
        try:
            plan = self._plan(timeline, sched, job_times, self.next_round, self.async_state)
            for t in range(self.next_round, sc.server.rounds):
                if stop["requested"]:
                    raise KeyboardInterrupt
                if plan.stop is not None:
                    raise BudgetExhausted(plan.stop)
                self._between_rounds = False
                t_start = time.perf_counter()
                self._commit(timeline, plan)
                following = None
                if t + 1 < sc.server.rounds:
                    following = self._plan(timeline, sched, job_times, t + 1, plan.async_state)
                rec = backend.round(t, plan.jobs, plan.keep_versions)
                per_client_rows = rec.pop("per_client_rows", None)
                rec = self._finish_record(plan, rec)
                rec["round_seconds"] = time.perf_counter() - t_start
                rec["wall_seconds"] = self.elapsed_before + time.perf_counter() - self._t0
                self.metrics.append(rec)
                metrics_file.write(json.dumps(_clean(rec), default=_json_default) + "\n")
                metrics_file.flush()
                if per_client_rows:
                    with open(self.run_dir / "per_client.jsonl", "a") as f:
                        f.writelines(json.dumps(_clean(r)) + "\n" for r in per_client_rows)
                for tracker in self.trackers:
                    tracker.log_round(rec, per_client_rows)
                self.next_round = t + 1
                self._between_rounds = True
                diverged = divergence(rec, self.initial, self.sc.runtime.divergence_factor)
                if diverged is not None:  # no checkpoint of a diverged model
                    raise Diverged(diverged)
                every = sc.output.checkpoint_every
                if (every and self.next_round % every == 0) or self.next_round == sc.server.rounds:
                    self._checkpoint(backend)
                progress.update(rec)
                if following is not None:
                    plan = following
        finally:
            metrics_file.close()
            progress.close()
        return "completed"

    # ------------------------------------------------------------------ planning
    def _plan(self, timeline: Timeline, sched: Any, job_times: Any, t: int,
              async_state: AsyncState | None) -> RoundPlan:
        """Decide round t without changing any state: who trains, for how long, and why
        others do not (unavailable, late, dropped, over their privacy budget)."""
        sc = self.sc
        if not self.plan.round_allowed():
            u = self.rsc.privacy.user_level
            assert self.plan.user is not None  # noqa: S101 - user-level DP is on
            return RoundPlan(t, [], None, {}, stop=(
                f"round {t} would exceed the user-level budget ε={u.epsilon} (δ={u.delta}); "
                f"ε spent after {t} rounds: {self.plan.user.epsilon(u.delta):.4f}"))
        lr = client_lr(sc, t)
        if sched is not None:
            state = async_state or start(sched, self.fed.num_clients, job_times,
                                         numpy_rng(sc.seed, "system", 0))
            done, new_state = next_buffer(sched, state, job_times,
                                          numpy_rng(sc.seed, "system", state.version + 1))
            weights = staleness_weights(sched, [j.staleness for j in done])
            jobs = [ClientJob(round=j.seq, client_id=j.client_id, lr=lr, version=j.start_version,
                              weight=float(w)) for j, w in zip(done, weights, strict=True)]
            info = {"staleness": [int(j.staleness) for j in done],
                    "dropped_total": int(new_state.dropped_total)}
            return RoundPlan(t, jobs, sorted(versions_in_use(new_state)), info,
                             participants=len(jobs), sim_time=float(new_state.time_s),
                             async_state=new_state)
        eligible = timeline.eligible(t)
        cohort = sample_cohort(sc.seed, t, self.fed.num_clients, method=sc.server.sampling,
                               clients_per_round=sc.server.clients_per_round,
                               sampling_rate=sc.server.sampling_rate, eligible=eligible)
        timing = timeline.simulate(t, cohort)
        jobs = [ClientJob(round=t, client_id=int(c), lr=lr, max_steps=int(k) if k < p else None)
                for c, ok, k, p in zip(timing.client_ids, timing.completed, timing.steps_done,
                                       timing.planned_steps, strict=True) if ok]
        exhausted = [j.client_id for j in jobs
                     if not self.plan.client_allowed(j.client_id, *timeline.dp_step(j),
                                                     round_=t)]
        if exhausted and self.plan.diff2_sigmas is not None:  # DIFF2 needs every client
            s = self.rsc.privacy.sample_level
            return RoundPlan(t, [], None, {}, stop=(
                f"round {t} would exceed the sample-level budget ε={s.epsilon} (δ={s.delta}) "
                f"of clients {exhausted}, and DIFF2 needs every client in every round"))
        jobs = [j for j in jobs if j.client_id not in exhausted]
        info: dict[str, Any] = {
            "participants": [int(c) for c in cohort],
            "dropped": [int(c) for c in timing.client_ids[timing.dropped]],
            "late": [int(c) for c in timing.client_ids[timing.late]],
            "unavailable": int((~eligible).sum()),
        }
        if self.rsc.privacy.sample_level.enabled:
            info["budget_exhausted"] = exhausted
        return RoundPlan(t, jobs, None, info, participants=len(cohort),
                         sim_duration=float(timing.duration_s))

    def _commit(self, timeline: Timeline, plan: RoundPlan) -> None:
        """Round ``plan.round`` starts: record its privacy cost and its clock state."""
        if plan.async_state is not None:
            self.async_state = plan.async_state
        if self.rsc.privacy.enabled:
            for j in plan.jobs:
                self.plan.record_client(j.client_id, *timeline.dp_step(j), round_=j.round)
            self.plan.record_round()

    def _finish_record(self, plan: RoundPlan, rec: dict[str, Any]) -> dict[str, Any]:
        prev = self.metrics[-1] if self.metrics else {}
        rec.update(plan.info)
        if self.rsc.privacy.enabled:
            rec.update(self.plan.metrics(self.fed.num_clients))
        rec["bytes_down"] = int(rec.pop("bytes_down_per_client", 0)) * plan.participants
        rec["bytes_up_total"] = int(prev.get("bytes_up_total", 0)) + int(rec.get("bytes_up", 0))
        rec["bytes_down_total"] = int(prev.get("bytes_down_total", 0)) + rec["bytes_down"]
        before = float(prev.get("sim_seconds", 0.0))
        now = plan.sim_time if plan.sim_time is not None else before + plan.sim_duration
        rec["round_sim_seconds"] = now - before
        rec["sim_seconds"] = now
        return rec


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere (nohup, batch jobs, a pipe)
    one plain line every ``output.progress_every`` rounds and never carriage-return frames."""

    def __init__(self, sc: Scenario, start: int, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.name, self.rounds = sc.name, sc.server.rounds
        self.enabled = sc.output.progress is not False
        self.every = sc.output.progress_every or max(1, self.rounds // 20)
        self.accuracy: tuple[int, float] | None = None
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=self.rounds, initial=start, desc=sc.name, unit="round",
                        dynamic_ncols=True, file=self.stream) if self.enabled and tty else None

    def update(self, rec: dict[str, Any]) -> None:
        """Round ``rec`` is done."""
        if rec.get("test_accuracy") is not None:
            self.accuracy = (int(rec["round"]), float(rec["test_accuracy"]))
        loss = rec.get("client_train_loss")
        loss_txt = f"{loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "n/a"
        if self.bar is not None:
            if self.accuracy is not None:
                self.bar.set_postfix(acc=f"{self.accuracy[1]:.3f}", loss=loss_txt)
            self.bar.update(1)
            return
        done = int(rec["round"]) + 1
        if not self.enabled or (done % self.every and done != self.rounds):
            return
        acc = ("test accuracy n/a" if self.accuracy is None else
               f"test accuracy {self.accuracy[1]:.4f} (round {self.accuracy[0]})")
        print(f"{self.name}: {done}/{self.rounds} rounds, {acc}, client_train_loss {loss_txt}, "
              f"{rec.get('wall_seconds', 0.0):.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def divergence(rec: dict[str, Any], initial: dict[str, Any], factor: float | None) -> str | None:
    """Why round ``rec`` diverged, or None.

    Diverged: ``client_train_loss`` infinite, an evaluated loss (``test_loss``,
    ``global_train_loss``) not finite, ``update_norm`` not finite, or any of those losses
    above ``factor`` × the initial model's evaluated loss (``initial``, the round -1 line).
    A NaN ``client_train_loss`` is an empty cohort (nobody's loss), not a divergence: a
    diverged model shows in the next evaluated loss.
    """
    if factor is None:
        return None
    ref = next((float(initial[k]) for k in ("test_loss", "global_train_loss")
                if isinstance(initial.get(k), float) and math.isfinite(initial[k])), None)
    for key in ("client_train_loss", "test_loss", "global_train_loss"):
        v = rec.get(key)
        if not isinstance(v, float):
            continue
        if math.isinf(v) or (math.isnan(v) and key != "client_train_loss"):
            return f"round {rec['round']}: {key} is {v}"
        if ref is not None and v > factor * ref:
            return (f"round {rec['round']}: {key} {v:.4g} > runtime.divergence_factor "
                    f"{factor:g} × the initial model's loss {ref:.4g}")
    norm = rec.get("update_norm")
    if isinstance(norm, float) and not math.isfinite(norm):
        return f"round {rec['round']}: update_norm is {norm}"
    return None


def computed_keys(sc: Scenario) -> dict[str, Any]:
    """The scenario keys that decide what a run computes: all but ``output`` (where and how
    it is written) and ``runtime`` (backends give the same numbers; resume may switch)."""
    return {k: v for k, v in sc.model_dump(mode="json").items() if k not in ("output", "runtime")}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; keys absent from ``old`` (added by a later fedflat
    version, at their defaults) are not changes."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k, v in old.items():
            out += changed_keys(v, new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


@dataclass
class RoundPlan:
    """Round t decided in advance (pure data)."""

    round: int
    jobs: list[ClientJob]
    keep_versions: list[int] | None
    info: dict[str, Any]
    participants: int = 0
    sim_duration: float = 0.0
    sim_time: float | None = None  # asynchronous mode: the clock after this server step
    async_state: AsyncState | None = None
    stop: str | None = None
