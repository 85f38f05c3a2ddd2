"""One-run privacy audit of a scenario's DP mechanism, through fedflat's own code.

``audit_scenario`` loads a scenario, resolves its privacy plan exactly as a run does
(calibrating σ or z when the scenario gives ε), and then runs the scenario's mechanism on
``m`` canaries, each included independently with probability ½ (Steinke, Nasr, Jagielski,
"Privacy Auditing with One (1) Training Run", NeurIPS 2023,
https://arxiv.org/abs/2305.08846; PRIVACY.md "Empirical audit"):

* **sample level** (DP-SGD and its DP-SAT / DP-SAM variants, ALGORITHMS.md §4.1-4.2): the
  scenario's model gets an extra parameter block of ``m`` coordinates that real examples
  never touch. Canary example i has loss c·θ_i, so its per-example gradient is exactly
  c·e_i in that block (c ≥ the clip norm). The included canaries join the real examples
  of one client (by default the smallest, whose sampling rate is the largest and on which
  σ is calibrated) and ``fedflat.client.update.client_update`` runs the scenario's DP
  oracle (``fedflat.runtime.build.build_local_rule``: Poisson batches, per-example
  clipping, noise on the sum) for the steps of all the client's planned participations.
  Scores are the canary coordinates of the released gradients, summed over steps.
* **user level** (DP-FedAvg with a fixed or adaptive clip, or DP-FedSAM's client-side
  noise, §4.3-4.5): the server steps of ``fedflat.runtime.build.user_level_steps`` (after
  each canary client's own clip and noise, ``client_noise_steps``, for DP-FedSAM) are
  applied for T = ``server.rounds`` rounds to cohorts of canary clients drawn by
  ``fedflat.runtime.sampling.sample_cohort`` (Poisson, the scenario's q; excluded
  canaries are never eligible). Canary client i sends the delta c·e_i. Scores are the
  canary coordinates of the released aggregates, summed over rounds.

The claimed ε is the accountant's (the scenario's accountant and conversion) for the
mechanism as configured, so an implementation fault that changes the mechanism but not the
accounting should be flagged, and a correct mechanism is flagged with probability ≤ α.
Faults for tests change the real mechanism's parameters while the claim stays put:
``noise_off`` (σ = 0), ``noise_scaled`` (σ/10), ``clipping_off`` (clip bound ∞ while the
noise keeps its scale σ·C) and ``sample_every_step`` (q = 1 for the canaries).

Scores are the canary coordinates of the released aggregates (a noisy sum divided by a
fixed constant: the expected batch size, or the expected cohort); a constant factor
changes no ranking. A one-run audit certifies at most ε ≈ 4 with m = 1000 (r = 400
guesses), so audit at a claimed ε near 1 (PRIVACY.md).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from fedflat.client.oracle_base import Batch, Metrics, Oracle, UpdateContext
from fedflat.client.update import LocalRule, LocalSchedule, client_update
from fedflat.client.uplink import UplinkContext, chain
from fedflat.errors import FedflatError
from fedflat.models.flat import FlatModel, Segment
from fedflat.models.zoo import build_model
from fedflat.privacy import central
from fedflat.privacy.accounting import epsilon as accounted_epsilon
from fedflat.privacy.audit import (
    FAULTS,
    audit_released,
    draw_inclusion,
    epsilon_lower_bound_from_counts,
)
from fedflat.privacy.mechanisms import DPState
from fedflat.privacy.plan import PrivacyPlan, expected_cohort, resolve_privacy
from fedflat.rng import stream
from fedflat.runtime.build import (
    FederatedData,
    build_local_rule,
    build_schedule,
    client_noise_steps,
    initial_params,
    user_level_steps,
)
from fedflat.runtime.preflight import preflight
from fedflat.runtime.sampling import sample_cohort
from fedflat.scenario.loader import LoadedScenario, load_scenario
from fedflat.scenario.schema import Scenario
from fedflat.server.pipeline import ServerRound, ServerStep

Level = Literal["sample", "user"]
LEVELS: tuple[str, ...] = ("sample", "user")
NOISE_SCALE = 0.1  # the "noise_scaled" fault: σ/10
CANARY_NORM_FACTOR = 10.0  # default canary norm c = 10 × the clip norm (≥ C, as required)
# "clipping_off" for server-side clipping: a finite stand-in for ∞ (the server steps
# refuse an infinite clip norm); the noise multiplier is divided by the same factor so
# that the noise std z·S on the sum is unchanged.
UNCLIPPED_FACTOR = 1e6
MAX_GROWTH_LOG = 30.0  # cap on log(C_T / C_0) in ``max_adaptive_clip``
CANARY_PARAM = "canary"  # name of the dummy block in ``CanaryModule``


class AuditInputError(FedflatError, ValueError):
    """A bad argument or scenario for the audit (a ``ValueError`` and a ``FedflatError``)."""


@dataclass(frozen=True)
class ScenarioAudit:
    """Outcome of ``audit_scenario`` (the fields of ``audit.AuditResult`` and the setting).

    Attributes:
        level: "sample" or "user".
        mechanism: dp_sgd / dp_sat / dp_sat_momentum / dp_sam (sample level) or
            dp_fedavg / adaptive_clipping / local_noise (user level).
        epsilon_lower_bound: ε_lb at confidence 1 − α.
        claimed_epsilon: ε the accountant reports for the configured mechanism.
        flagged: ε_lb > claimed ε (the claim is refuted at level α).
        delta: δ of the claim.
        alpha: significance level.
        num_canaries: m.
        num_included: canaries drawn "in".
        guesses: r = k₊ + k₋.
        correct: v.
        noise_multiplier: σ (sample level, per release) or z (user level) configured.
        accounted_noise_multiplier: the σ the accountant records per step.
        sampling_rate: q of the claim (examples per step, or clients per round).
        steps: T (local steps over all participations, or rounds).
        clip_norm: C or S (adaptive clipping: the initial clip).
        canary_norm: c, the norm of a canary's gradient or delta.
        accountant: "rdp", "prv" or "pld".
        fault: the injected fault, or None.
        max_certifiable_epsilon: ε_lb if every guess were right: no claim above it can
            be refuted by this audit (m, r, δ and α limit it).
        client_id: the audited client (sample level), else None.
        participations: participations audited (sample level), else None.
        seconds: wall time of the audit.
        notes: caveats of this audit.
    """

    level: str
    mechanism: str
    epsilon_lower_bound: float
    claimed_epsilon: float
    flagged: bool
    delta: float
    alpha: float
    num_canaries: int
    num_included: int
    guesses: int
    correct: int
    noise_multiplier: float
    accounted_noise_multiplier: float
    sampling_rate: float
    steps: int
    clip_norm: float
    canary_norm: float
    accountant: str
    fault: str | None
    max_certifiable_epsilon: float = math.inf
    client_id: int | None = None
    participations: int | None = None
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["notes"] = list(self.notes)
        return out


# ----------------------------------------------------------------------------- canaries
class CanaryModule(nn.Module):
    """The scenario's model plus a dummy block θ of ``m`` parameters.

    ``forward`` returns ``[logits, c·θ]`` (shape [B, K + m]); labels ``y < K`` are real
    classes, ``y = K + i`` marks canary i (see ``canary_loss``). The base model never
    reads θ, and the loss of a real example never reads c·θ, so real examples have a zero
    gradient in the dummy block and canaries a zero gradient in the model.
    """

    def __init__(self, base: nn.Module, num_canaries: int, canary_norm: float) -> None:
        super().__init__()
        self.base = base
        self.canary = nn.Parameter(torch.zeros(num_canaries))
        self.canary_norm = float(canary_norm)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.base(x)
        block = (self.canary * self.canary_norm).expand(logits.shape[0], -1)
        return torch.cat([logits, block], 1)


def canary_loss(num_classes: int) -> Any:
    """Loss over ``CanaryModule`` outputs: cross-entropy for real labels, c·θ_i for canary i.

    Branch-free (``torch.where``) so that ``torch.func.vmap`` can take per-example
    gradients; the unselected branch contributes an exact zero gradient.
    """

    def loss(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        k = num_classes
        real = nn.functional.cross_entropy(
            out[:, :k], y.clamp(max=k - 1), reduction="none"
        )
        canary = out.gather(1, y.unsqueeze(1)).squeeze(1)  # out[:, K + i] = c·θ_i
        per = torch.where(y < k, real, canary)
        return per.sum() if reduction == "sum" else per.mean()

    return loss


def canary_model(sc: Scenario, fed: FederatedData, num_canaries: int,
                 canary_norm: float) -> tuple[FlatModel, Tensor]:
    """The audit model (scenario model + dummy block) and its initial flat parameters.

    The model part starts from the run's own initialisation; the dummy block from zero.
    """
    ds, m = fed.dataset, sc.model
    base = build_model(m.name, ds.in_shape, ds.num_classes, hidden=m.hidden,
                       channels=m.channels, norm=m.norm, groups=m.groups)
    plain = FlatModel(build_model(m.name, ds.in_shape, ds.num_classes, hidden=m.hidden,
                                  channels=m.channels, norm=m.norm, groups=m.groups))
    model = FlatModel(CanaryModule(base, num_canaries, canary_norm))
    model.loss_fn = canary_loss(ds.num_classes)
    init = plain.unflatten(initial_params(sc, plain))
    w0 = torch.zeros(model.num_params)
    for seg in model.segments:
        if seg.name != CANARY_PARAM:
            w0[seg.slice] = init[seg.name.removeprefix("base.")].reshape(-1)
    return model, w0


def canary_block(model: FlatModel) -> slice:
    """Where the dummy block sits in the audit model's flat vector."""
    return next(s.slice for s in model.segments if s.name == CANARY_PARAM)


def recording(oracle: Oracle, block: slice, released: list[Tensor]) -> Oracle:
    """``oracle`` that also appends the ``block`` coordinates of every gradient it returns.

    The list is the audit's tap on the release; the oracle's behaviour is unchanged.
    """

    def grad(w: Tensor, batch: Batch, state: Any, gen: torch.Generator,
             ctx: UpdateContext) -> tuple[Tensor, Tensor, Any, Metrics]:
        loss, g, state, metrics = oracle.grad(w, batch, state, gen, ctx)
        released.append(g[block].detach().clone())
        return loss, g, state, metrics

    return Oracle(init=oracle.init, grad=grad, passes=oracle.passes)


def without_clipping(oracle: Oracle, num_tensors: int) -> Oracle:
    """The ``clipping_off`` fault of a DP oracle: per-tensor clip bounds ∞.

    ``private_gradient`` then scales no example down, while its noise keeps std σ·C.
    """

    def init(ctx: UpdateContext) -> DPState:
        state = oracle.init(ctx)
        return state._replace(layer_clips=(math.inf,) * num_tensors)

    return Oracle(init=init, grad=oracle.grad, passes=oracle.passes)


# ----------------------------------------------------------------------------- checks
def _check_args(canaries: int, fault: str | None, alpha: float, level: str | None,
                canary_norm: float | None, k_plus: int | None, k_minus: int | None) -> None:
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 2:
        raise AuditInputError(f"canaries must be an integer >= 2, got {canaries!r}")
    if fault is not None and fault not in FAULTS:
        raise AuditInputError(f"fault must be None or one of {list(FAULTS)}, got {fault!r}")
    if not 0.0 < alpha < 1.0:
        raise AuditInputError(f"alpha must be in (0, 1), got {alpha}")
    if level is not None and level not in LEVELS:
        raise AuditInputError(f"level must be None or one of {list(LEVELS)}, got {level!r}")
    if canary_norm is not None and not (math.isfinite(canary_norm) and canary_norm > 0):
        raise AuditInputError(f"canary_norm must be a finite number > 0, got {canary_norm}")
    kp = canaries // 5 if k_plus is None else k_plus
    km = canaries // 5 if k_minus is None else k_minus
    if kp < 0 or km < 0 or kp + km > canaries or kp + km == 0:
        raise AuditInputError(
            f"need k_plus >= 0, k_minus >= 0 and 0 < k_plus + k_minus <= canaries = "
            f"{canaries}, got k_plus={kp}, k_minus={km}")


def _choose_level(sc: Scenario, level: str | None) -> Level:
    p = sc.privacy
    if level is None:
        if p.sample_level.enabled and p.user_level.enabled:
            raise AuditInputError("both privacy.sample_level and privacy.user_level are "
                                  "enabled: choose one with level='sample' or 'user' "
                                  "(--level)")
        if p.sample_level.enabled:
            return "sample"
        if p.user_level.enabled:
            return "user"
        raise AuditInputError("the scenario enables no DP mechanism: set "
                              "privacy.sample_level.enabled or privacy.user_level.enabled")
    if level == "sample" and not p.sample_level.enabled:
        raise AuditInputError("level='sample' but privacy.sample_level.enabled is false")
    if level == "user" and not p.user_level.enabled:
        raise AuditInputError("level='user' but privacy.user_level.enabled is false")
    return level  # type: ignore[return-value]


# ----------------------------------------------------------------------------- sample level
def participations(sc: Scenario, num_clients: int) -> int:
    """Participations of one client the sample-level plan accounts for.

    As ``resolve_privacy``: the ``participation_quantile`` of Binomial(rounds, cohort
    rate), at least 1.
    """
    rate = min(1.0, expected_cohort(sc, num_clients) / num_clients)
    q = sc.privacy.sample_level.participation_quantile
    return max(int(stats.binom.ppf(q, sc.server.rounds, rate)), 1)


def _sample_audit(loaded: LoadedScenario, fed: FederatedData, plan: PrivacyPlan, *,
                  num_canaries: int, fault: str | None, canary_norm: float | None,
                  k_plus: int, k_minus: int, alpha: float,
                  client: int | None) -> ScenarioAudit:
    sc = plan.scenario  # noise multiplier resolved
    s = sc.privacy.sample_level
    sizes = fed.client_sizes()
    cid = int(np.argmin(sizes)) if client is None else int(client)
    if not 0 <= cid < len(sizes):
        raise AuditInputError(f"client must be in [0, {len(sizes) - 1}], got {client}")
    n = int(sizes[cid])
    schedule = build_schedule(sc)
    q = schedule.rate(n)
    per_part = schedule.num_steps(n)
    parts = participations(sc, fed.num_clients)
    total_steps = per_part * parts
    if plan.sample_sigma is None or plan.sample_sigma_accounted is None:
        raise RuntimeError("the privacy plan has no sample-level σ although "
                           "privacy.sample_level is enabled")
    sigma, sigma_acc = plan.sample_sigma, plan.sample_sigma_accounted
    claimed = accounted_epsilon(sampling_rate=q, steps=total_steps, noise_multiplier=sigma_acc,
                                delta=s.delta, accountant=sc.privacy.accountant,
                                conversion=sc.privacy.conversion)
    c = CANARY_NORM_FACTOR * s.clip_norm if canary_norm is None else float(canary_norm)
    notes: list[str] = []
    if c <= s.clip_norm and fault == "clipping_off":
        notes.append(f"canary_norm {c} <= clip_norm {s.clip_norm}: clipping_off cannot show")

    # The real mechanism, with the fault's parameter change (the claim is unchanged).
    run_sigma = {"noise_off": 0.0, "noise_scaled": sigma * NOISE_SCALE}.get(fault or "", sigma)
    faulty = sc.model_copy(update={"privacy": sc.privacy.model_copy(update={
        "sample_level": s.model_copy(update={"noise_multiplier": run_sigma})})})
    rule = build_local_rule(faulty)
    model, w = canary_model(sc, fed, num_canaries, c)
    oracle = rule.oracle
    if fault == "clipping_off":
        oracle = without_clipping(oracle, len(model.segments))
    if s.per_layer_clipping:
        notes.append("per-layer clipping: a canary (one tensor) is clipped to its layer "
                     "bound C_l < C, so the audit is weaker than with flat clipping")
    if s.mechanism == "dp_sam":
        notes.append("dp_sam: only the second release of each step (the gradient used) is "
                     "scored; the accountant covers both")
    block = canary_block(model)
    released: list[Tensor] = []
    q_run = 1.0 if fault == "sample_every_step" else q
    audit_rule = LocalRule(
        oracle=recording(oracle, block, released), corrections=(),  # corrections post-process
        optimizer=rule.optimizer, grad_clip=rule.grad_clip,
        schedule=LocalSchedule(batch_size=schedule.batch_size, epochs=None, steps=per_part,
                               batching="poisson", sampling_rate=q_run))

    included = draw_inclusion(num_canaries, stream(sc.seed, "audit", 0))
    ds = fed.dataset
    if fed.source is not None:  # data.synthetic.on_demand: the device generates its examples
        x_own, y_own, _, _ = fed.source.device(cid)
        x_real, y_real = torch.from_numpy(x_own), torch.from_numpy(y_own)
    else:
        ix = torch.as_tensor(fed.client_indices[cid])
        x_real, y_real = ds.x_train[ix], ds.y_train[ix]
    inc_ids = torch.as_tensor(np.flatnonzero(included), dtype=torch.long)
    x = torch.cat([x_real, x_real.new_zeros((len(inc_ids), *x_real.shape[1:]))])
    y = torch.cat([y_real, ds.num_classes + inc_ids])
    model.module.train()
    for p in range(parts):
        ctx = UpdateContext(model=model, x_global=w, round=p, client_id=cid, num_samples=n)
        res = client_update(audit_rule, ctx, x, y, sc.client.lr, stream(sc.seed, "audit", 1, p))
        w = w + res.delta  # the next participation starts where this one ended
    result = audit_released(torch.stack(released), included, claimed_epsilon=claimed,
                            delta=s.delta, k_plus=k_plus, k_minus=k_minus, alpha=alpha)
    return ScenarioAudit(
        level="sample", mechanism=s.mechanism, epsilon_lower_bound=result.epsilon_lower_bound,
        claimed_epsilon=result.claimed_epsilon, flagged=result.flagged, delta=s.delta,
        alpha=alpha, num_canaries=num_canaries, num_included=int(included.sum()),
        guesses=result.guesses, correct=result.correct, noise_multiplier=sigma,
        accounted_noise_multiplier=sigma_acc, sampling_rate=q, steps=total_steps,
        clip_norm=s.clip_norm, canary_norm=c, accountant=sc.privacy.accountant, fault=fault,
        client_id=cid, participations=parts, notes=tuple(notes))


# ----------------------------------------------------------------------------- user level
def _restore_excess(step: ServerStep, expected_clients: float) -> ServerStep:
    """``clipping_off`` for adaptive clipping: add back what the clip C_t removed.

    The aggregate becomes (Σ Δ_i + N(0, z_Δ² C_t² I)) / m, i.e. an infinite clip bound
    while the noise keeps its scale z_Δ·C_t.
    """

    def apply(rnd: ServerRound, state: Any, gen: torch.Generator) -> Any:
        c = float(state["clip_norm"])
        out, new_state, metrics = step.apply(rnd, state, gen)
        clipped, _, _ = central.clip_rows(rnd.deltas, c)
        excess = (rnd.deltas - clipped).sum(0) / expected_clients
        return out.with_(aggregate=out.aggregate + excess), new_state, metrics

    return ServerStep(step.name, init=step.init, apply=apply)


def max_adaptive_clip(sc: Scenario) -> float:
    """The largest clip norm adaptive clipping can reach within the scenario's rounds.

    The noisy fraction b̄ lies in [0, 1], so one round multiplies C by at most
    exp(η_C·γ) (geometric) or adds at most η_C·γ (arithmetic). The exponent is capped at
    ``MAX_GROWTH_LOG`` to stay far inside float32; a canary of 10× this norm is clipped in
    every round of a correct mechanism (while C_t stays below it).
    """
    ac = sc.privacy.user_level.adaptive_clipping
    growth = ac.clip_lr * ac.target_quantile * sc.server.rounds
    if ac.update == "arithmetic":
        return ac.initial_clip + growth
    return ac.initial_clip * math.exp(min(growth, MAX_GROWTH_LOG))


def _user_mechanism(sc: Scenario) -> str:
    u = sc.privacy.user_level
    if u.noise_placement == "client":
        return "local_noise"
    return "adaptive_clipping" if u.adaptive_clipping.enabled else "dp_fedavg"


def _user_audit(loaded: LoadedScenario, fed: FederatedData, plan: PrivacyPlan, *,
                num_canaries: int, fault: str | None, canary_norm: float | None,
                k_plus: int, k_minus: int, alpha: float) -> ScenarioAudit:
    sc = plan.scenario
    u = sc.privacy.user_level
    n_pop = fed.num_clients
    assert plan.user_sigma is not None  # noqa: S101 - user level is enabled
    assert plan.user_sigma_accounted is not None  # noqa: S101 - set with user_sigma
    z, q, rounds = plan.user_sigma, plan.user_q, sc.server.rounds
    claimed = accounted_epsilon(sampling_rate=q, steps=rounds,
                                noise_multiplier=plan.user_sigma_accounted,
                                delta=u.delta, accountant=sc.privacy.accountant,
                                conversion=sc.privacy.conversion)
    mechanism = _user_mechanism(sc)
    adaptive = mechanism == "adaptive_clipping"
    clip = u.adaptive_clipping.initial_clip if adaptive else u.clip_norm
    c = (CANARY_NORM_FACTOR * (max_adaptive_clip(sc) if adaptive else clip)
         if canary_norm is None else float(canary_norm))
    notes = ["canary-only cohorts: real clients' deltas do not touch the canary "
             "coordinates and are left out"]
    if mechanism == "local_noise":
        notes.append(
            f"local_noise: a round holds about q·m/2 = {q * num_canaries / 2:.0f} canary "
            f"clients, each adding noise σC/√{expected_cohort(sc, n_pop):g}, so the released sum "
            "carries more noise than the σ·C the accountant assumes: the audit is weak "
            "(only gross faults such as noise_off show)")

    # The fault's parameter change; the claim above keeps z and q.
    update: dict[str, Any] = {}
    if fault == "noise_off":
        update["noise_multiplier"] = 0.0
    elif fault == "noise_scaled":
        update["noise_multiplier"] = z * NOISE_SCALE
    elif fault == "clipping_off" and not adaptive:
        update = {"clip_norm": u.clip_norm * UNCLIPPED_FACTOR,
                  "noise_multiplier": z / UNCLIPPED_FACTOR}
    faulty = sc.model_copy(update={"privacy": sc.privacy.model_copy(update={
        "user_level": u.model_copy(update=update)})})
    segments = [Segment("canary", (num_canaries,), 0, num_canaries, nn.Module)]
    try:
        steps = user_level_steps(faulty, n_pop)
        # DP-FedSAM: each canary client clips and noises its own delta (its uplink chain).
        uplink = chain(*client_noise_steps(faulty, n_pop, segments))
    except ValueError as exc:  # e.g. adaptive clipping with z ≥ 2σ_b, as a run would fail
        raise loaded.error("privacy.user_level", str(exc)) from None
    m_exp = expected_cohort(sc, n_pop)
    if fault == "clipping_off" and adaptive:
        steps = [_restore_excess(steps[0], m_exp)]

    included = draw_inclusion(num_canaries, stream(sc.seed, "audit", 0))
    q_run = 1.0 if fault == "sample_every_step" else q
    params = torch.zeros(num_canaries)
    states = [st.init(params) for st in steps]
    released = []
    for t in range(rounds):
        cohort = sample_cohort(sc.seed, t, num_canaries, method="poisson", clients_per_round=1,
                               sampling_rate=q_run, eligible=included)
        ids = torch.as_tensor(cohort, dtype=torch.long)
        deltas = torch.zeros(len(cohort), num_canaries)
        deltas[torch.arange(len(cohort)), ids] = c  # canary i sends c·e_i
        if uplink.steps and cohort:
            deltas = torch.stack([uplink.update(row, {}, UplinkContext(sc.seed, t, cid))[0]
                                  for row, cid in zip(deltas, cohort, strict=True)])
        rnd = ServerRound(round=t, params=params, deltas=deltas,
                          weights=torch.ones(len(cohort)), client_ids=list(cohort),
                          num_clients=num_canaries)
        gen = stream(sc.seed, "audit", 2, t)
        if mechanism == "local_noise" and not cohort:
            released.append(torch.zeros(num_canaries))  # nothing is sent
            continue
        for i, st in enumerate(steps):
            rnd, states[i], _ = st.apply(rnd, states[i], gen)
        assert rnd.aggregate is not None  # noqa: S101 - the DP steps aggregate
        released.append(rnd.aggregate.detach().clone())
    result = audit_released(torch.stack(released), included, claimed_epsilon=claimed,
                            delta=u.delta, k_plus=k_plus, k_minus=k_minus, alpha=alpha)
    return ScenarioAudit(
        level="user", mechanism=mechanism, epsilon_lower_bound=result.epsilon_lower_bound,
        claimed_epsilon=result.claimed_epsilon, flagged=result.flagged, delta=u.delta,
        alpha=alpha, num_canaries=num_canaries, num_included=int(included.sum()),
        guesses=result.guesses, correct=result.correct, noise_multiplier=z,
        accounted_noise_multiplier=plan.user_sigma_accounted, sampling_rate=q, steps=rounds,
        clip_norm=clip, canary_norm=c, accountant=sc.privacy.accountant, fault=fault,
        notes=tuple(notes))


# ----------------------------------------------------------------------------- entry
def audit_scenario(
    source: str | Path | dict[str, Any] | Scenario,
    overrides: dict[str, Any] | Sequence[str] | None = None,
    *,
    canaries: int = 1000,
    fault: str | None = None,
    level: str | None = None,
    canary_norm: float | None = None,
    k_plus: int | None = None,
    k_minus: int | None = None,
    alpha: float = 0.05,
    client: int | None = None,
) -> ScenarioAudit:
    """Audit the DP mechanism of a scenario in one run (Steinke, Nasr, Jagielski 2023).

    Args:
        source: a scenario YAML path, dict or ``Scenario`` (as ``fedflat.run``).
        overrides: ``{"key.path": value}`` or ``["key.path=value"]``.
        canaries: m ≥ 2, the number of canaries.
        fault: None or one of ``audit.FAULTS`` ("noise_off", "noise_scaled",
            "clipping_off", "sample_every_step"): change the real mechanism while the
            claimed ε stays that of the configured one.
        level: "sample" or "user"; default the one the scenario enables (required when
            both are).
        canary_norm: c, the norm of a canary's gradient (sample level) or delta (user
            level); default 10 × the clip norm (with adaptive clipping, 10 × the largest
            clip it can reach in the run, ``max_adaptive_clip``).
        k_plus: "in" guesses for the highest scores; default m // 5.
        k_minus: "out" guesses for the lowest scores; default m // 5.
        alpha: significance level α of the bound.
        client: the client audited at sample level; default the smallest (largest q).

    Returns:
        ``ScenarioAudit``: ε lower bound, claimed ε, whether it is flagged, and the setting.

    Raises:
        AuditInputError: bad argument, or a scenario without the requested DP level.
        ScenarioError: an invalid scenario, missing data or an impossible budget.
    """
    t0 = time.perf_counter()
    _check_args(canaries, fault, alpha, level, canary_norm, k_plus, k_minus)
    kp = canaries // 5 if k_plus is None else int(k_plus)
    km = canaries // 5 if k_minus is None else int(k_minus)
    from fedflat.runtime.driver import load_data  # the run's own data errors

    loaded = load_scenario(source, dict(overrides) if isinstance(overrides, dict)
                           else list(overrides or []))
    sc = loaded.scenario
    try:
        chosen = _choose_level(sc, level)
    except AuditInputError as exc:  # located at the scenario's privacy block
        raise loaded.error("privacy", str(exc)) from None
    fed = load_data(loaded)
    preflight(loaded, fed)  # the run's checks before round 0: δ bounds, located budget errors
    try:
        # num_tensors: the user-level canaries form one tensor; the sample-level audit
        # claims per client and never reads it.
        plan = resolve_privacy(sc, fed.client_sizes(), build_schedule(sc), num_tensors=1)
    except ValueError as exc:  # an impossible budget, as in a run
        raise loaded.error("privacy", str(exc)) from None
    common = {"num_canaries": canaries, "fault": fault, "canary_norm": canary_norm,
              "k_plus": kp, "k_minus": km, "alpha": alpha}
    if chosen == "sample":
        res = _sample_audit(loaded, fed, plan, client=client, **common)
    else:
        res = _user_audit(loaded, fed, plan, **common)
    ceiling = epsilon_lower_bound_from_counts(num_canaries=canaries, guesses=res.guesses,
                                              correct=res.guesses, delta=res.delta,
                                              alpha=alpha)
    notes = res.notes
    if res.claimed_epsilon >= ceiling:
        notes += (f"the claimed ε {res.claimed_epsilon:.3g} is above the {ceiling:.3g} that "
                  f"even all {res.guesses} guesses right would certify (m, δ, α limit "
                  "one-run audits): this audit cannot refute it; audit at ε ≈ 1 "
                  "(e.g. --set the epsilon) or with more canaries",)
    return dataclasses.replace(res, seconds=time.perf_counter() - t0,
                               max_certifiable_epsilon=ceiling, notes=notes)
