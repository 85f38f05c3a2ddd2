"""``fedflat flower simulate``: a scenario through Flower's simulation engine.

One virtual SuperNode per client (``num_supernodes = data.num_clients``, partition-id =
client id), fedflat's ClientApp on the nodes and fedflat's ServerApp as the server, all in
Flower's Ray-based simulation runtime. Cohorts, client randomness and the server pipeline
are fedflat's, so the final model equals the serial backend's for the same scenario and
seed (up to float reduction order when the thread counts differ).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from fedflat.errors import FedflatError
from fedflat.flower.client_app import ClientSettings, make_client_app
from fedflat.flower.server_app import FlowerRunError, ServerSettings, make_server_app
from fedflat.runtime.driver import RunResult, load_data, new_run_dir
from fedflat.runtime.preflight import preflight
from fedflat.scenario.diff2 import flower_problem
from fedflat.scenario.loader import load_scenario
from fedflat.scenario.schema import Scenario


def backend_config(sc: Scenario, *, cpus_per_client: float | None = None,
                   total_cpus: int | None = None, worker_logs: bool = False) -> dict[str, Any]:
    """Flower's simulation backend config for a scenario.

    Flower's default gives each virtual client 2 CPUs, so a 2-core machine runs one
    client at a time; fedflat gives each ``runtime.num_cpus`` (default 1) and starts Ray
    with ``runtime.num_actors * runtime.num_cpus`` CPUs, i.e. two concurrent workers on two
    cores with the default scenario runtime.

    Args:
        sc: the scenario (its ``runtime`` block sizes the pool).
        cpus_per_client: CPUs per virtual client (default ``runtime.num_cpus``).
        total_cpus: CPUs Ray may use (default ``runtime.num_actors * cpus_per_client``).
        worker_logs: show the Ray workers' output (a failing client is reported by the
            server either way: the error travels back in its reply).

    Raises:
        ValueError: a non-positive CPU count, naming it.
    """
    per = float(cpus_per_client if cpus_per_client is not None else sc.runtime.num_cpus)
    if per <= 0:
        raise ValueError(f"cpus_per_client must be > 0, got {per}")
    total = total_cpus if total_cpus is not None else max(1, math.ceil(sc.runtime.num_actors * per))
    if total < 1:
        raise ValueError(f"total_cpus must be >= 1, got {total}")
    return {
        "client_resources": {"num_cpus": per, "num_gpus": float(sc.runtime.num_gpus)},
        "init_args": {"num_cpus": int(total), "num_gpus": math.ceil(
            sc.runtime.num_actors * sc.runtime.num_gpus), "include_dashboard": False,
            "configure_logging": False, "log_to_driver": bool(worker_logs)},
    }


def simulate(
    source: str | Path | dict[str, Any] | Scenario,
    overrides: dict[str, Any] | list[str] | None = None,
    out: str | Path | None = None,
    *,
    cpus_per_client: float | None = None,
    total_cpus: int | None = None,
    verbose: bool = False,
    secagg: bool = False,
) -> RunResult:
    """Run a scenario through Flower's simulation engine.

    Args:
        source: a scenario YAML path, a dict, or a Scenario.
        overrides: as ``fedflat run --set``.
        out: the run folder (default ``<output.dir>/<name>/<timestamp>``).
        cpus_per_client, total_cpus: see :func:`backend_config`.
        verbose: Flower's DEBUG logs.
        secagg: run every round through SecAgg+ (also when the scenario's
            ``flower.secagg`` is true); see :mod:`fedflat.flower.secagg`.

    Returns:
        The RunResult (final parameters, metrics, run folder, summary).

    Raises:
        ScenarioError: invalid scenario or missing data (before anything starts).
        FlowerRunError: a Ray instance already running in this process (Flower's engine
            shuts Ray down when it ends), or a run that failed inside Flower.
    """
    import ray
    from flwr.simulation import run_simulation

    # Scenario errors come first: they name the user's mistake, whatever the process state.
    loaded = load_scenario(source, overrides)
    sc = loaded.scenario
    if sc.topology.kind != "none":  # a gossip run has no server for Flower to host
        raise loaded.error("topology.kind", f"decentralized training (topology.kind: "
                           f"{sc.topology.kind}) has no server for Flower; run it with "
                           "'fedflat run' (serial backend)")
    if (diff2 := flower_problem(sc)) is not None:
        raise loaded.error(*diff2)
    use_secagg = bool(secagg) or bool(getattr(getattr(sc, "flower", None), "secagg", False))
    if use_secagg:  # refuse before Ray starts
        from fedflat.flower.secagg_checks import check_secagg

        check_secagg(loaded)
    if ray.is_initialized():
        raise FlowerRunError("Ray is already running in this process; Flower's simulation "
                             "engine would use it and shut it down at the end. Run "
                             "'fedflat flower simulate' in a fresh process.")
    fed = load_data(loaded)
    preflight(loaded, fed)  # as `fedflat run`: what fails before round 0, before the folder
    run_dir = new_run_dir(sc, out)
    settings = ServerSettings(out=run_dir, prepared=(loaded, fed), secagg=use_secagg)
    threads = max(1, math.ceil(cpus_per_client or sc.runtime.num_cpus))
    if use_secagg:
        from fedflat.flower.secagg import make_secagg_client_app, make_secagg_server_app

        client_app = make_secagg_client_app(ClientSettings(threads=threads))
        server_app = make_secagg_server_app(settings)
    else:
        client_app = make_client_app(ClientSettings(threads=threads))
        server_app = make_server_app(settings)
    # Ray workers import fedflat through PYTHONPATH (Flower copies sys.path into it); keep
    # Ray from spilling its own logs into the user's terminal unless asked.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not verbose:  # Flower warns that run_simulation is deprecated, once per call
        flwr_log.setLevel(logging.ERROR)
    error: BaseException | None = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=fed.num_clients,
                           backend_config=backend_config(sc, cpus_per_client=cpus_per_client,
                                                         total_cpus=total_cpus,
                                                         worker_logs=verbose),
                           verbose_logging=verbose)
    except FedflatError:
        raise
    except BaseException as exc:
        error = exc
    finally:
        flwr_log.setLevel(level)
    result = settings.result.get("run")
    if result is None:  # the ServerApp raised: summary.json says why, else the engine does
        path = run_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        why = summary.get("error") or (f"{type(error).__name__}: {error}" if error is not None
                                       else "the ServerApp did not finish")
        raise FlowerRunError(f"Flower simulation failed: {why} (run folder {run_dir})")
    return result
