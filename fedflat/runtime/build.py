"""Build the pieces of a run from a scenario: data, model, local rule, server pipeline.

Every backend (serial, Ray actors, Flower apps) calls these same builders, so the client
update and the server pipeline are identical wherever they run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedflat.attacks.byzantine import attack_step, byzantine_ids
from fedflat.client.adversarial import adversarial_oracle
from fedflat.client.local_chain import LocalStep
from fedflat.client.local_corrections import feddyn, fedprox, mofedsam, scaffold
from fedflat.client.optim import LocalOptimizer, adam, sgd
from fedflat.client.oracle_base import Oracle
from fedflat.client.oracles import build_oracle
from fedflat.client.update import LocalRule, LocalSchedule
from fedflat.client.uplink import UplinkChain, UplinkStep, chain, encode
from fedflat.client.zeroth_order import zo_oracle
from fedflat.comm.codecs import codec_from_config
from fedflat.data import partition as part
from fedflat.data.client_test import ClientTestSplits, client_test_split
from fedflat.data.datasets import Dataset, load_dataset, load_synthetic_devices
from fedflat.data.synthetic import SyntheticDevices
from fedflat.errors import DataError
from fedflat.models.flat import FlatModel, Segment
from fedflat.models.zoo import build_model
from fedflat.privacy import central, client_noise
from fedflat.privacy.diff2 import diff2_oracle, diff2_server, release_sigmas
from fedflat.privacy.mechanisms import DP_ORACLES
from fedflat.privacy.plan import expected_cohort
from fedflat.rng import numpy_rng, stream
from fedflat.scenario.local_rule import (
    CorrectionConfig,
    FedOptConfig,
    OracleConfig,
    SwaConfig,
)
from fedflat.scenario.partition import PartitionConfig
from fedflat.scenario.schema import Scenario
from fedflat.server import optimizers as server_opt
from fedflat.server.correction_state import (
    feddyn_server,
    fedsmoo_server,
    prev_update_broadcast,
    scaffold_server,
)
from fedflat.server.fedopt import fedadagrad, fedadam, fedyogi
from fedflat.server.pipeline import Pipeline, ServerRound, ServerStep
from fedflat.server.rules import rule_step
from fedflat.server.swa import swa_client_lr, swa_start_round, swa_step


@dataclass
class FederatedData:
    """Base arrays plus, for each client, the indices of its training samples; or, with
    ``data.synthetic.on_demand``, no arrays and no indices but the devices (``source``)
    that generate a client's examples when it is sampled."""

    dataset: Dataset
    client_indices: Sequence[np.ndarray]  # a list, or runtime.shared_data.IndexLists
    source: SyntheticDevices | None = None
    # Every client's own test split (eval.client_test; fedflat.data.client_test), None where
    # there is none (on-demand devices, a Flower node's own data file).
    client_test: ClientTestSplits | None = None

    @property
    def num_clients(self) -> int:
        return self.source.num_devices if self.source is not None else len(self.client_indices)

    def client_sizes(self) -> np.ndarray:
        if self.source is not None:
            return self.source.train_sizes
        sizes = getattr(self.client_indices, "sizes", None)  # IndexLists: from its offsets
        return sizes() if sizes is not None else np.array([len(ix) for ix in self.client_indices])


def build_data(sc: Scenario) -> FederatedData:
    """Load the dataset and split it into clients as the scenario says.

    Raises:
        DataError: a missing or unreadable data file, or too few natural clients.
    """
    d = sc.data
    if d.dataset == "synthetic" and d.synthetic.on_demand:
        return _on_demand(sc)
    try:
        ds = load_dataset(d.dataset, data_dir=d.data_dir, seed=sc.seed, num_clients=d.num_clients,
                          synthetic=d.synthetic.model_dump() if d.dataset == "synthetic" else None,
                          shakespeare=d.shakespeare.model_dump())
    except DataError as exc:
        raise DataError(str(exc), key=exc.key or "data.data_dir") from None
    except ValueError as exc:
        raise DataError(str(exc), key="data.dataset") from None
    p = d.partition
    labels = ds.y_train.numpy()
    rng = numpy_rng(sc.seed, "partition")
    n = d.num_clients
    try:
        parts = _split(p, ds, labels, n, rng)
    except ValueError as exc:  # a partitioner that cannot satisfy its constraints
        raise DataError(str(exc), key="data.partition") from None
    try:  # a local holdout leaves the training data here, before any backend sees it
        train, test = client_test_split(sc, ds, [np.asarray(ix, dtype=np.int64) for ix in parts])
    except ValueError as exc:
        raise DataError(str(exc), key="eval.client_test") from None
    return FederatedData(ds, train, client_test=test)


def _on_demand(sc: Scenario) -> FederatedData:
    """data.synthetic.on_demand: the devices only (their examples come when sampled)."""
    if sc.data.partition.method != "natural":
        raise DataError("data.synthetic.on_demand needs data.partition.method: natural (the "
                        "devices are the clients)", key="data.partition.method")
    if sc.eval.per_client:
        raise DataError("eval.per_client is not available with data.synthetic.on_demand (it "
                        "scores every client's test split)", key="eval.per_client")
    if sc.eval.client_test == "local_holdout":
        raise DataError("eval.client_test: local_holdout is not available with "
                        "data.synthetic.on_demand (devices are generated when sampled)",
                        key="eval.client_test")
    if sc.personalization.method != "none":
        raise DataError("personalization is not available with data.synthetic.on_demand (it "
                        "scores every client's test split)", key="personalization.method")
    try:
        ds, devices = load_synthetic_devices(sc.seed, sc.data.num_clients,
                                             sc.data.synthetic.model_dump())
    except ValueError as exc:
        raise DataError(str(exc), key="data.synthetic") from None
    return FederatedData(ds, [], source=devices)


def _split(
    p: PartitionConfig, ds: Dataset, labels: np.ndarray, n: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if p.method == "natural":
        if ds.train_groups is None:
            raise DataError(f"dataset {ds.name!r} has no natural clients",
                            key="data.partition.method")
        if len(ds.train_groups) < n:
            raise DataError(f"dataset {ds.name!r} has {len(ds.train_groups)} natural clients, "
                            f"fewer than data.num_clients = {n}", key="data.num_clients")
        parts = part.natural(ds.train_groups[:n])
    else:
        parts = part.make_partition(p.method, labels, n, rng, num_classes=ds.num_classes,
                                    **p.factory_kwargs())
    return parts


def build_flat_model(sc: Scenario, ds: Dataset, device: str | torch.device = "cpu") -> FlatModel:
    m = sc.model
    module = build_model(m.name, ds.in_shape, ds.num_classes, hidden=m.hidden,
                         channels=m.channels, norm=m.norm, groups=m.groups,
                         lstm_hidden=m.lstm_hidden)
    return FlatModel(module, device=device)


def initial_params(sc: Scenario, model: FlatModel) -> torch.Tensor:
    return model.init_params(stream(sc.seed, "init"))


# ---------------------------------------------------------------- local rule and server steps
# (scenario blocks -> client/server pieces; kept here so that fedflat.scenario imports no
# client or server code)
def local_rule_parts(
    oracle: OracleConfig, correction: CorrectionConfig, *, weight_decay: float = 0.0
) -> tuple[Oracle, tuple[LocalStep, ...]]:
    """The client's oracle and its corrections, in the order the local chain applies them.

    Order: mofedsam (scales the oracle's gradient by α, so it comes first), fedprox,
    scaffold, feddyn (the vectorised engine applies them in this order too).

    Args:
        oracle: the oracle block.
        correction: the corrections block.
        weight_decay: the client optimizer's weight decay (used by SAM when
            ``wd_in_perturbation``).
    """
    corrections: list[LocalStep] = []
    if correction.mofedsam_alpha is not None:
        corrections.append(mofedsam(alpha=correction.mofedsam_alpha))
    if correction.prox_mu is not None:
        corrections.append(fedprox(mu=correction.prox_mu))
    built = build_oracle(oracle, weight_decay=weight_decay)
    if correction.scaffold:
        corrections.append(scaffold())
    if correction.feddyn_alpha is not None:
        corrections.append(feddyn(alpha=correction.feddyn_alpha))
    return built, tuple(corrections)


def build_server_corrections(
    oracle: OracleConfig, correction: CorrectionConfig, *, num_clients: int
) -> tuple[ServerStep, ...]:
    """Server steps the local rule needs, in order; chain them right **after** the
    optimizer step (FedAvg / FedAdam / ...) and before SWA.

    feddyn_server (moves new_params), scaffold_server (c only), fedsmoo_server,
    prev_update_broadcast (FedLESAM / MoFedSAM; last, it reads the final new_params).
    """
    steps: list[ServerStep] = []
    if correction.feddyn_alpha is not None:
        steps.append(
            feddyn_server(alpha=correction.feddyn_alpha, num_clients=num_clients)
        )
    if correction.scaffold:
        steps.append(scaffold_server(num_clients=num_clients))
    if oracle.name == "fedsmoo":
        steps.append(fedsmoo_server(rho=oracle.rho))
    if oracle.name == "lesam" or correction.mofedsam_alpha is not None:
        steps.append(prev_update_broadcast())
    return tuple(steps)


def build_fedopt(name: str, *, lr: float, config: FedOptConfig) -> ServerStep:
    """FedAdam / FedYogi / FedAdagrad step from its block (``adam`` = ``fedadam``)."""
    key = name if name.startswith("fed") else f"fed{name}"
    common = {
        "lr": lr,
        "beta1": config.beta1 if config.beta1 is not None else (
            0.0 if key == "fedadagrad" else 0.9),
        "tau": config.tau,
        "bias_correction": config.bias_correction,
        "initial_accumulator": config.initial_accumulator,
    }
    if key == "fedadam":
        return fedadam(beta2=config.beta2, **common)
    if key == "fedyogi":
        return fedyogi(beta2=config.beta2, **common)
    if key == "fedadagrad":
        return fedadagrad(**common)
    raise ValueError(
        f"unknown adaptive server optimizer {name!r}; known: fedadam, fedyogi, "
        "fedadagrad"
    )


def build_swa(config: SwaConfig, *, num_rounds: int) -> ServerStep | None:
    """The SWA server step (last in the pipeline), or None when SWA is off."""
    if not config.enabled:
        return None
    return swa_step(
        start_round=swa_start_round(config.start, num_rounds),
        cycle=config.cycle,
        collect=config.collect,
    )




def byzantine_clients(sc: Scenario, num_clients: int) -> frozenset[int]:
    """The run's Byzantine client ids (fixed for the run, drawn from the "attack" stream)."""
    a = sc.attack
    if a.kind == "none":
        return frozenset()
    return byzantine_ids(num_clients, a.fraction, a.ids, stream(sc.seed, "attack"))


def build_optimizer(sc: Scenario) -> LocalOptimizer:
    c = sc.client
    if c.optimizer == "adam":
        return adam(weight_decay=c.weight_decay)
    return sgd(momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.nesterov)


def build_schedule(sc: Scenario) -> LocalSchedule:
    """Local steps and batches; sample-level DP uses Poisson batches (never resampled)."""
    c = sc.client
    dp = sc.privacy.sample_level
    poisson = dp.enabled and dp.mechanism != "diff2"  # DIFF2: one full batch, q = 1
    return LocalSchedule(
        batch_size=(dp.expected_batch_size or c.batch_size) if poisson else c.batch_size,
        epochs=c.local_epochs if c.local_steps is None else None,
        steps=c.local_steps,
        batching="poisson" if poisson else "shuffle",
        sampling_rate=dp.sampling_rate if poisson else None,
    )


def diff2_sigmas(sc: Scenario) -> tuple[float, float]:
    """(σ1, σ2) of DIFF2's full and difference releases from the resolved noise multiplier."""
    dp = sc.privacy.sample_level
    if dp.noise_multiplier is None:
        raise ValueError("sample-level DP needs a resolved noise multiplier (resolve_privacy)")
    return release_sigmas(dp.noise_multiplier, sc.server.rounds, dp.diff2.period,
                          dp.diff2.sigma_split)


def build_local_rule(sc: Scenario) -> LocalRule:
    c = sc.client
    schedule = build_schedule(sc)
    oracle, corrections = local_rule_parts(c.oracle, c.correction, weight_decay=c.weight_decay)
    dp = sc.privacy.sample_level
    if dp.enabled and dp.mechanism == "diff2":
        oracle = diff2_oracle(clip_full=dp.clip_norm, clip_diff=dp.diff2.clip_diff,
                              sigmas=diff2_sigmas(sc), period=dp.diff2.period)
    elif dp.enabled:
        if dp.noise_multiplier is None:
            raise ValueError("sample-level DP needs a resolved noise multiplier (resolve_privacy)")
        common = {"clip_norm": dp.clip_norm, "noise_multiplier": dp.noise_multiplier,
                  "per_layer": dp.per_layer_clipping}
        if dp.sampling_rate is not None:
            common["sampling_rate"] = dp.sampling_rate
        else:
            common["expected_batch_size"] = schedule.batch_size
        oracle = DP_ORACLES[dp.mechanism](**common, **dp.factory_kwargs())
    zo = c.zeroth_order
    if zo.enabled:  # the estimate replaces the gradient (checks refuse other oracles, DP)
        oracle = zo_oracle(zo.queries, zo.mu, zo.estimator)
    if sc.adversarial.enabled:  # outermost: every oracle (SAM, DP) sees the adversarial batch
        oracle = adversarial_oracle(oracle, sc.adversarial.train_attack())
    return LocalRule(oracle=oracle, corrections=corrections, optimizer=build_optimizer(sc),
                     schedule=schedule, grad_clip=c.grad_clip)


def client_lr(sc: Scenario, round_: int) -> float:
    """The local learning rate of round ``round_`` (decay, then SWA's cyclic schedule)."""
    lr = sc.client.lr * sc.client.lr_decay**round_
    swa = sc.server.swa
    if swa.enabled:
        lr = swa_client_lr(round_, base_lr=lr, swa_lr=swa.swa_lr,
                           start_round=swa_start_round(swa.start, sc.server.rounds),
                           cycle=swa.cycle)
    return lr


def _client_noise_weighting(sc: Scenario) -> None:
    # The clients' N(0, σ²C²/m) is calibrated for a uniform mean: a sample-weighted one gives
    # the heaviest client a smaller multiplier than the accountant records (cross_checks
    # refuses it in a scenario file; this catches a Scenario built another way).
    if sc.server.aggregation.weighting != "uniform":
        raise ValueError(
            "privacy.user_level.noise_placement: client needs server.aggregation.weighting: "
            f"uniform, got {sc.server.aggregation.weighting!r}")


def client_noise_steps(sc: Scenario, num_clients: int,
                       segments: Sequence[Segment] | None = None) -> tuple[UplinkStep, ...]:
    """DP-FedSAM's clip and noise for the uplink chain (empty unless user-level DP with
    ``noise_placement: client``)."""
    u = sc.privacy.user_level
    if not (u.enabled and u.noise_placement == "client"):
        return ()
    if u.noise_multiplier is None:
        raise ValueError("user-level DP needs a resolved noise multiplier (resolve_privacy)")
    _client_noise_weighting(sc)
    return client_noise.client_noise_steps(
        clip_norm=u.clip_norm, noise_multiplier=u.noise_multiplier,
        clients_per_round=expected_cohort(sc, num_clients), clip_scope=u.clip_scope,
        segments=segments)


def build_uplink(sc: Scenario, num_clients: int,
                 segments: Sequence[Segment] | None = None) -> UplinkChain:
    """The client's uplink chain: [clip -> noise (DP-FedSAM)] -> codec, in that order, so
    that the codec and its error-feedback residual only see the privatised delta."""
    return chain(*client_noise_steps(sc, num_clients, segments),
                 encode(codec_from_config(sc.comm.uplink)))


def user_level_steps(sc: Scenario, num_clients: int) -> list[ServerStep]:
    """User-level DP in place of the rule: clip -> noisy sum over the expected cohort
    (DP-FedAvg), the adaptive-clipping variant, or, with DP-FedSAM's client-side noise
    (added in the clients' uplink chain, ``build_uplink``), the uniform mean."""
    u = sc.privacy.user_level
    if u.noise_multiplier is None:
        raise ValueError("user-level DP needs a resolved noise multiplier (resolve_privacy)")
    m = expected_cohort(sc, num_clients)
    if u.noise_placement == "client":
        _client_noise_weighting(sc)
        return [rule_step("mean", {}, weighting="uniform"),
                central.cohort_noise_topup(noise_multiplier=u.noise_multiplier,
                                           clip_norm=u.clip_norm, expected_clients=m)]
    ac = u.adaptive_clipping
    if ac.enabled:
        return [central.adaptive_clipping(
            initial_clip=ac.initial_clip, target_quantile=ac.target_quantile, clip_lr=ac.clip_lr,
            count_noise=ac.resolved_count_noise(m), noise_multiplier=u.noise_multiplier,
            expected_clients=m, update=ac.update)]
    return [central.clip_deltas(clip_norm=u.clip_norm),
            central.gaussian_sum_noise(noise_multiplier=u.noise_multiplier, clip_norm=u.clip_norm,
                                       expected_clients=m)]


def buffer_scale(buffer_size: int) -> ServerStep:
    """FedBuff (Nguyen et al. 2022, Alg. 1): the step is Σ w_i Δ_i / K, not a weighted mean.

    Placed after a weighted rule (``weighting: samples``) whose weights are the staleness
    weights w_i, it rescales the mean Σ w_i Δ_i / Σ w_i by Σ w_i / K.
    """

    def apply(rnd: ServerRound, state: Any, gen: torch.Generator):
        assert rnd.aggregate is not None  # noqa: S101 - placed after the rule
        scale = float(rnd.weights.sum()) / buffer_size
        return (rnd.with_(aggregate=rnd.aggregate * scale), state,
                {"async/weight_sum": scale * buffer_size})

    return ServerStep("buffer_scale", init=lambda p: (), apply=apply)


def staleness_scale() -> ServerStep:
    """FedBuff under ``weighting: uniform``: each update times its own staleness weight.

    An unweighted rule never sees the weights, so rescaling its mean afterwards (as
    :func:`buffer_scale` does) would give every update the same Σ w_j / K² instead of its
    own w_i / K. Placed before the rule, this step makes the rows w_i Δ_i, so the plain
    mean over the K buffered deltas is Algorithm 1's Σ w_i Δ_i / K; a robust rule then
    aggregates the staleness-damped deltas.
    """

    def apply(rnd: ServerRound, state: Any, gen: torch.Generator):
        w = rnd.weights.to(dtype=rnd.deltas.dtype, device=rnd.deltas.device)
        return (rnd.with_(deltas=rnd.deltas * w.unsqueeze(1)), state,
                {"async/weight_sum": float(w.sum())})

    return ServerStep("staleness_scale", init=lambda p: (), apply=apply)


def build_pipeline(sc: Scenario, num_clients: int) -> Pipeline:
    """The server pipeline, in order: attack (replaces Byzantine rows) -> rule -> [DIFF2's
    estimator] -> server optimizer -> corrections' server steps (FedDyn, SCAFFOLD, FedSMOO,
    broadcasts) -> SWA."""
    s = sc.server
    steps: list[ServerStep] = []
    byz = byzantine_clients(sc, num_clients)
    if byz and sc.attack.kind != "label_flip":  # label flipping happens in the client's data
        steps.append(attack_step(byz, sc.attack, aggregation=s.aggregation, seed=sc.seed))
    agg = s.aggregation
    user = sc.privacy.user_level
    if user.enabled:
        steps.extend(user_level_steps(sc, num_clients))
    else:
        # FedBuff applies s(τ_i) to each update in either weighting: as the weights of a
        # weighted rule, rescaled after it, or on the rows before an unweighted one.
        asynchronous = sc.system.asynchronous
        if asynchronous is not None and agg.weighting == "uniform":
            steps.append(staleness_scale())
        steps.append(rule_step(agg.rule, agg.rule_params(), weighting=agg.weighting))
        if asynchronous is not None and agg.weighting == "samples":
            steps.append(buffer_scale(asynchronous.buffer_size))
    dp = sc.privacy.sample_level
    if dp.enabled and dp.mechanism == "diff2":  # the mean of releases -> −η·v (then the optimizer)
        steps.append(diff2_server(period=dp.diff2.period, lr=lambda t: client_lr(sc, t)))
    if s.optimizer == "fedavgm":
        steps.append(server_opt.fedavgm(lr=s.lr, momentum=s.momentum))
    elif s.optimizer in ("fedadam", "fedyogi", "fedadagrad"):
        steps.append(build_fedopt(s.optimizer, lr=s.lr, config=s.fedopt))
    else:
        steps.append(server_opt.fedavg(lr=s.lr))
    steps.extend(build_server_corrections(sc.client.oracle, sc.client.correction,
                                          num_clients=num_clients))
    swa = build_swa(s.swa, num_rounds=s.rounds)
    if swa is not None:
        steps.append(swa)
    return Pipeline(steps)
