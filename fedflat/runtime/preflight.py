"""Every check that can run before round 0, shared by ``fedflat validate`` and ``run``.

``run`` calls :func:`preflight` before it creates the run folder, so a scenario that would
fail in round 0 (an impossible privacy budget, a missing or malformed system trace, a δ
above the bound for the data) leaves nothing behind; ``validate`` calls the same function,
so what passes ``validate --data`` gets past round 0's set-up. It builds only what is
cheap and pure: the device profiles (reading the trace files), the privacy plan (the noise
calibration, cached on disk) and, with adaptive clipping, the noise split.

Without the data (``validate`` without ``--data``) the population is ``data.num_clients``,
which is enough for the traces and user-level calibration; sample-level calibration needs
the clients' sizes, so only its data-free floor (the RDP accountant's smallest ε at δ) is
checked then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedflat.comm.system import client_profiles
from fedflat.errors import ScenarioError
from fedflat.privacy.accounting import adaptive_clip_noise_split, rdp_epsilon_floor
from fedflat.privacy.plan import PrivacyPlan, expected_cohort, resolve_privacy
from fedflat.rng import numpy_rng
from fedflat.runtime.build import FederatedData, build_schedule
from fedflat.scenario.diff2 import diff2_data_problem
from fedflat.scenario.loader import LoadedScenario
from fedflat.scenario.privacy import UserLevelPrivacy, delta_problem
from fedflat.scenario.schema import Scenario


@dataclass
class Preflight:
    """What the checks built: the privacy plan (None without DP or without the data for
    sample-level DP) and the notes of its calibration."""

    plan: PrivacyPlan | None
    notes: list[str]


def scenario_dir(loaded: LoadedScenario) -> Path | None:
    """The folder relative trace paths are resolved against: the scenario file's."""
    path = Path(loaded.file)
    return path.parent if path.is_file() else None


def preflight(loaded: LoadedScenario, fed: FederatedData | None = None) -> Preflight:
    """Run every check that can run before round 0.

    Args:
        loaded: the validated scenario (with its lines, for located errors).
        fed: the federated data, when built (``run``, ``validate --data``).

    Raises:
        ScenarioError: naming the file, the key and its line (or the trace file, its line and
            column) of the first problem.
    """
    sc = loaded.scenario
    if sc.output.tensorboard or sc.output.mlflow is not None:  # a tracker's library missing
        from fedflat.report.tracking import missing_libraries

        for key, msg in missing_libraries(sc):
            raise loaded.error(key, msg)
    num_clients = fed.num_clients if fed is not None else sc.data.num_clients
    _check_traces(loaded, num_clients)
    if fed is not None and sc.privacy.sample_level.enabled:
        n = int(fed.client_sizes().sum())
        problem = delta_problem(sc.privacy.sample_level.delta, n, "training examples")
        if problem:
            raise loaded.error("privacy.sample_level.delta", problem)
    if fed is not None:
        problem2 = diff2_data_problem(sc, fed.client_sizes().tolist())
        if problem2:
            raise loaded.error(*problem2)
    plan = _privacy_plan(loaded, fed, num_clients)
    if plan is not None:
        _check_adaptive_clipping(loaded, plan, num_clients)
    return Preflight(plan=plan, notes=list(plan.notes) if plan is not None else [])


def _check_traces(loaded: LoadedScenario, num_clients: int) -> None:
    """Read the system traces as the run will (same files, same base folder)."""
    sc = loaded.scenario
    try:
        client_profiles(num_clients, sc.system, numpy_rng(sc.seed, "system"),
                        base_dir=scenario_dir(loaded))
    except ScenarioError as exc:
        if exc.file is None and exc.key:  # a path that does not resolve: the scenario's line
            raise loaded.error(exc.key, exc.message) from None
        raise  # a problem inside the trace file: its own file, line and column


def _privacy_plan(loaded: LoadedScenario, fed: FederatedData | None,
                  num_clients: int) -> PrivacyPlan | None:
    sc = loaded.scenario
    p = sc.privacy
    if not p.enabled:
        return None
    if fed is None and p.sample_level.enabled:
        s = p.sample_level
        if s.epsilon is not None and p.accountant == "rdp":
            floor = rdp_epsilon_floor(delta=s.delta, conversion=p.conversion)
            if s.epsilon <= floor:
                raise loaded.error("privacy.sample_level.epsilon", (
                    f"epsilon={s.epsilon} is impossible for the RDP accountant at "
                    f"delta={s.delta}: even infinite noise gives ε={floor:.4g}; raise epsilon "
                    "or use accountant: pld or prv"))
        # The per-client calibration needs the clients' sizes: user level only.
        sc = sc.model_copy(update={"privacy": p.model_copy(
            update={"sample_level": p.sample_level.model_copy(update={"enabled": False})})})
        if not p.user_level.enabled:
            return None
    sizes = fed.client_sizes() if fed is not None else np.ones(num_clients, dtype=np.int64)
    try:
        return _calibrate(sc, sizes)
    except ValueError as exc:  # a budget no noise can meet
        raise loaded.error(_failing_level(loaded, sizes), str(exc)) from None


def _calibrate(sc: Scenario, sizes: np.ndarray) -> PrivacyPlan:
    """The run's privacy plan (``Runner.execute`` resolves the same one). Whether a budget
    is reachable does not depend on the model's tensor count (per_tensor clipping scales
    the applied σ by √K after calibrating σ/√K), so one tensor stands for the model here."""
    return resolve_privacy(sc, sizes, build_schedule(sc), num_tensors=1)


def _failing_level(loaded: LoadedScenario, sizes: np.ndarray) -> str:
    """Which target ε failed to calibrate (the levels are calibrated independently)."""
    sc = loaded.scenario
    p = sc.privacy
    if not (p.sample_level.enabled and p.user_level.enabled):
        return "privacy.sample_level.epsilon" if p.sample_level.enabled \
            else "privacy.user_level.epsilon"
    sample_only = sc.model_copy(update={"privacy": p.model_copy(
        update={"user_level": UserLevelPrivacy()})})
    try:
        _calibrate(sample_only, sizes)
    except ValueError:
        return "privacy.sample_level.epsilon"
    return "privacy.user_level.epsilon"


def _check_adaptive_clipping(loaded: LoadedScenario, plan: PrivacyPlan, num_clients: int) -> None:
    """With a calibrated z, adaptive clipping still needs z < 2σ_b (ALGORITHMS.md §4.4)."""
    u = plan.scenario.privacy.user_level
    ac = u.adaptive_clipping
    if not (u.enabled and ac.enabled and plan.user_sigma is not None):
        return
    try:
        adaptive_clip_noise_split(
            noise_multiplier=plan.user_sigma,
            count_noise=ac.resolved_count_noise(expected_cohort(plan.scenario, num_clients)))
    except ValueError as exc:
        raise loaded.error("privacy.user_level.adaptive_clipping.count_noise",
                           f"{exc} (z calibrated for epsilon={u.epsilon})") from None
