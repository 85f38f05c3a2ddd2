"""The typed scenario schema: every key, its default, its unit and its meaning.

A scenario is one YAML file. ``fedflat validate`` checks it against these models; the
README's scenario reference is generated from the field descriptions
(``python -m fedflat.scenario.reference``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedflat.scenario.adversarial import AdversarialConfig, adversarial_checks
from fedflat.scenario.aggregation import AggregationSpec, MeanRule, check_aggregation
from fedflat.scenario.attack import AttackConfig, check_attack
from fedflat.scenario.comm import CommConfig
from fedflat.scenario.diff2 import diff2_checks
from fedflat.scenario.flower import FlowerConfig
from fedflat.scenario.local_rule import (
    CorrectionConfig,
    FedOptConfig,
    OracleSpec,
    SgdOracle,
    SwaConfig,
)
from fedflat.scenario.partition import LABEL_PARTITIONS, NaturalPartition, PartitionSpec
from fedflat.scenario.personalization import PersonalizationConfig, personalization_checks
from fedflat.scenario.privacy import DP_MECHANISM_CONFIGS, PrivacyConfig, delta_problem
from fedflat.scenario.resources import resource_checks
from fedflat.scenario.system import SystemConfig
from fedflat.scenario.topology import TopologyConfig, topology_checks
from fedflat.scenario.vectorize import vectorize_checks
from fedflat.scenario.zeroth_order import ZerothOrderConfig, zeroth_order_checks


class Section(BaseModel):
    """Base of every scenario block: unknown keys are errors, values are checked strictly."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class SyntheticConfig(Section):
    alpha: float = Field(
        1.0, ge=0, description="Synthetic(α, β): spread of the device model prior u_k ~ N(0, α).")
    beta: float = Field(
        1.0, ge=0, description="Synthetic(α, β): spread of the device feature prior B_k ~ N(0, β).")
    iid: bool = Field(
        False, description="Synthetic-IID: one global model and x ~ N(0, Σ) on every device.")
    prior_scale: Literal["std", "variance"] = Field(
        "std", description="How α and β are read: 'std' as the released FedProx code "
        "(np.random.normal scale), 'variance' as the paper writes them (std = sqrt). "
        "Identical for 0 and 1.")
    num_features: int = Field(60, ge=1, description="Input dimension.")
    num_classes: int = Field(10, ge=2, description="Number of classes.")
    size_mean: float = Field(
        4.0, description="Device sizes ⌊LogNormal(size_mean, size_sigma)⌋ + min_size.")
    size_sigma: float = Field(2.0, ge=0, description="Log-normal sigma of the device sizes.")
    min_size: int = Field(50, ge=1, description="Added to every device size (samples).")
    max_size: int | None = Field(
        None, ge=1,
        description="Optional cap on a device's size (samples); None = no cap as in the paper.")
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Per-device share of samples held out for testing.")
    on_demand: bool = Field(
        False, description="Generate each device's examples from (seed, device id) when it is "
        "sampled instead of pooling all devices up front: the population then costs only its "
        "sizes (16 bytes a device; for 10^5-10^6 devices). Same sizes and distribution as the "
        "pooled generator, different draws. Needs data.partition.method: natural; evaluation "
        "uses a sample of eval.max_samples examples (10000 when unset).")


class ShakespeareConfig(Section):
    stride: int = Field(
        1, ge=1, description="Step between the 80-character windows of a role's text "
        "(characters); 1 = every position, as LEAF.")
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of each role's samples held out as its test set "
        "(the last ones in text order).")


class DataConfig(Section):
    dataset: Literal["synthetic", "digits", "femnist", "mnist", "fashion_mnist", "cifar10",
                     "shakespeare"] = Field(
        "synthetic", description="Dataset. synthetic and digits are built in; the others read "
        "files from data_dir (shakespeare: LEAF next-character prediction, one client per "
        "(play, role)).")
    data_dir: str | None = Field(None, description="Directory holding the dataset folders "
                                 "(femnist/, mnist/, ...). "
                                 "Defaults to the environment variable FEDFLAT_DATA.")
    num_clients: int = Field(
        100, ge=1,
        description="Number of clients N (synthetic devices, FEMNIST writers, or partitions).")
    partition: PartitionSpec = Field(
        default_factory=NaturalPartition,
        description="How training samples are split across clients, chosen by method; each "
        "partitioner takes only its own keys (listed per partitioner below). Default natural.")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    shakespeare: ShakespeareConfig = Field(default_factory=ShakespeareConfig)


class ModelConfig(Section):
    name: Literal["logistic", "mlp", "cnn", "char_lstm", "resnet8", "resnet18"] = Field(
        "logistic", description="logistic = multinomial logistic regression; mlp; cnn = "
        "LeNet-style (images only); char_lstm = LEAF's character LSTM (shakespeare); resnet8 / "
        "resnet18 = CIFAR ResNets with GroupNorm (FedSAM's).")
    lstm_hidden: int = Field(
        64, ge=1, description="char_lstm: width of each of its 2 LSTM layers (LEAF uses 256; "
        "64 keeps CPU runs fast).")
    hidden: list[int] = Field(
        [200], description="MLP hidden widths; the CNN uses hidden[0] for its dense layer.")
    channels: list[int] = Field([32, 64], description="CNN convolution widths.")
    norm: Literal["none", "group", "batch", "layer"] = Field(
        "none", description="CNN normalisation layer (GroupNorm for DP).")
    groups: int = Field(8, ge=1, description="GroupNorm groups.")
    bn_aggregation: Literal["average", "local"] = Field(
        "average", description="With norm: batch, the BatchNorm running statistics: 'average' = "
        "part of the global model, averaged with the client weights and broadcast (FedSAM's code); "
        "'local' = each client keeps its own (FedBN), evaluation then per client.")


class ClientConfig(Section):
    zeroth_order: ZerothOrderConfig = Field(default_factory=ZerothOrderConfig)
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="Base local optimizer (PyTorch semantics).")
    lr: float = Field(0.01, gt=0, description="Local learning rate η.")
    lr_decay: float = Field(
        1.0, gt=0, le=1,
        description="Per-round multiplicative decay of the local lr (η_t = η·decay^t).")
    momentum: float = Field(
        0.0, ge=0, lt=1, description="Local SGD momentum (buffers reset every round).")
    nesterov: bool = Field(False, description="Nesterov momentum.")
    weight_decay: float = Field(0.0, ge=0, description="Coupled L2 weight decay λ.")
    local_epochs: int | None = Field(
        1, ge=1, description="Local epochs E (ignored when local_steps is set).")
    local_steps: int | None = Field(
        None, ge=1, description="Local steps K per round (overrides local_epochs).")
    batch_size: int = Field(10, ge=1, description="Local mini-batch size b.")
    grad_clip: float | None = Field(
        None, gt=0,
        description="Optional global-norm clip of the local gradient (FL-Simulator uses 10).")
    oracle: OracleSpec = Field(
        default_factory=SgdOracle,
        description="The gradient oracle, chosen by name; each oracle takes only its own "
        "keys (listed per oracle below). Default sgd.")
    correction: CorrectionConfig = Field(default_factory=CorrectionConfig)


class ServerConfig(Section):
    rounds: int = Field(100, ge=1, description="Number of communication rounds T.")
    clients_per_round: int = Field(
        10, ge=1,
        description="Clients per round m (uniform sampling), or the expected number (Poisson).")
    sampling: Literal["uniform", "poisson"] = Field(
        "uniform", description="'uniform' = m clients without replacement; 'poisson' = each "
        "client independently with rate q (cohort size varies, may be empty; required for "
        "user-level DP accounting).")
    sampling_rate: float | None = Field(
        None, gt=0, le=1, description="Poisson rate q; default clients_per_round / num_clients.")
    optimizer: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = Field(
        "fedavg", description="Server optimizer on the aggregate (a negative pseudo-gradient), "
        "ALGORITHMS.md §3.5.")
    lr: float = Field(1.0, gt=0, description="Server learning rate η_g.")
    momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum β.")
    fedopt: FedOptConfig = Field(default_factory=FedOptConfig)
    aggregation: AggregationSpec = Field(
        default_factory=MeanRule,
        description="Aggregation rule over the stacked client deltas, chosen by rule; each "
        "rule takes only its own keys (listed per rule below); ALGORITHMS.md §5.1, "
        "fedflat.server.rules. Default mean.")
    swa: SwaConfig = Field(default_factory=SwaConfig)


class RuntimeConfig(Section):
    backend: Literal["serial", "ray", "vmap"] = Field(
        "serial", description="'serial' = in-process reference; 'ray' = a pool of client actors "
        "plus a server actor; 'vmap' = in-process, all clients of a round trained at once "
        "(torch.func.vmap).")
    num_actors: int = Field(2, ge=1, description="Ray: number of client actors.")
    num_cpus: float = Field(
        1.0, gt=0,
        description="Ray: CPUs per client actor (also its torch thread count, rounded up).")
    num_gpus: float = Field(
        0.0, ge=0,
        description="Ray: GPUs per client actor (fractional allowed); > 0 trains on CUDA.")
    address: str | None = Field(
        None, description="Ray: join an existing cluster ('auto' or 'ray://host:10001'); None "
        "starts a local Ray for the run.")
    threads: int | None = Field(
        1, ge=1,
        description="torch threads in the serial and vmap backends and the driver (None = "
        "torch default, one per core). 1: faster than 2 on the quickstart and on a loaded "
        "machine, and what each Ray or Flower simulated client uses, so that every backend "
        "gives the same numbers with the defaults.")
    vectorize: bool = Field(
        False, description="Ray: each client actor trains its chunk at once with the vmap "
        "engine instead of one client after another.")
    placement: Literal["none", "pack", "spread", "strict_spread"] = Field(
        "none", description="Ray: place the client actors through a placement group (one "
        "bundle of num_cpus/num_gpus per actor): 'spread' = over as many nodes as possible, "
        "'strict_spread' = one actor per node, 'pack' = as few nodes as possible; 'none' = "
        "wherever Ray's scheduler puts them.")
    on_actor_failure: Literal["retry", "drop"] = Field(
        "retry", description="Ray: when a client actor dies mid-round it is replaced and its "
        "chunk is 'retry'-ed on the replacement (same result: the final model equals an "
        "uninterrupted run) or its clients are 'drop'-ped from that round.")
    divergence_factor: float | None = Field(
        100.0, gt=0,
        description="Stop with status 'diverged' (exit code 3) when a round's loss "
        "(client_train_loss or an evaluated loss) is non-finite or exceeds this many times the "
        "initial model's evaluated loss (round 0); None = never stop.")


class SharpnessConfig(Section):
    lambda_max: bool = Field(
        False, description="Log the top Hessian eigenvalue of the global model (power iteration "
        "with HVPs, §7.1).")
    trace: bool = Field(
        False, description="Log the Hessian trace (Hutchinson, §7.2) and its standard error.")
    m_sharpness: bool = Field(
        False, description="Log SAM's m-sharpness (§7.3) with subsets of size m.")
    every: int = Field(
        10, ge=1, description="Compute the selected sharpness metrics every this many rounds (and "
        "after the last).")
    num_samples: int = Field(
        512, ge=1, description="Fixed evaluation subset of the pooled training data (samples).")
    batch_size: int = Field(256, ge=1, description="Batch size for Hessian-vector products.")
    max_iter: int = Field(100, ge=1, description="Power-iteration / Hutchinson iterations at most.")
    tol: float = Field(1e-3, gt=0, description="Relative tolerance to stop early.")
    rho: float = Field(0.05, gt=0, description="m-sharpness radius ρ.")
    m: int = Field(32, ge=1, description="m-sharpness subset size m.")
    ascent_steps: int = Field(
        1, ge=1, description="m-sharpness ascent steps k (1 = SAM's first-order ε).")


class EvalConfig(Section):
    every: int = Field(
        1, ge=1,
        description="Evaluate the global model every this many rounds (and after the last).")
    split: Literal["test", "train", "both"] = Field(
        "test", description="Which pooled split to evaluate.")
    max_samples: int | None = Field(
        None, ge=1, description="Evaluate on at most this many samples (a fixed subset).")
    sharpness: SharpnessConfig = Field(default_factory=SharpnessConfig)
    per_client: bool = Field(
        False, description="Also evaluate the global model on each client's own test split "
        "(every eval.every rounds): per_client.jsonl plus mean, std, worst/best-10 % and Gini "
        "summaries in metrics.jsonl; each trained client also evaluates its own local model.")
    per_client_sample: int | None = Field(
        None, ge=1, description="Evaluate a fixed seeded sample of this many clients (clients); "
        "None = all.")
    client_test: Literal["auto", "dataset_share", "local_holdout"] = Field(
        "auto", description="Each client's own test split, for eval.per_client and "
        "personalization alike: 'dataset_share' = the dataset's own per-client test data under "
        "a natural partition (synthetic, femnist, shakespeare), else a disjoint share of the "
        "test set mirroring the client's training labels (training data untouched); "
        "'local_holdout' = eval.holdout_fraction of the client's own samples, removed from its "
        "training data; 'auto' = local_holdout for a personalized run on a dataset without "
        "per-client test data, else dataset_share.")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="local_holdout: share f of each client's n samples held "
        "out as its test split: ceil(f·n), at least 1, leaving at least 1 (fraction).")


class MlflowConfig(Section):
    tracking_uri: str = Field(
        "mlruns", description="MLflow tracking URI (a path = a local file store, relative to the "
        "working directory).")
    experiment: str = Field("fedflat", description="MLflow experiment name.")


class OutputConfig(Section):
    dir: str = Field(
        "runs",
        description="Parent directory of run folders (runs/<name>/<timestamp>/); --out overrides.")
    checkpoint_every: int = Field(
        10, ge=0, description="Save a checkpoint every this many rounds (0 = only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    progress: bool | None = Field(
        None, description="Progress on stderr: a tqdm bar when stderr is a terminal, else one "
        "plain line every output.progress_every rounds (None and true alike); false = nothing.")
    progress_every: int | None = Field(
        None, ge=1, description="Rounds between plain progress lines when stderr is not a "
        "terminal (None = about 20 lines per run: max(1, server.rounds // 20)).")
    plots: bool = Field(
        True, description="Draw the run's own plots into plots/ at the end (about 1 s; fedflat "
        "report draws them later too).")
    tensorboard: bool = Field(
        False, description="Write every metric as TensorBoard scalars (and per-client accuracy "
        "histograms) under <run folder>/tensorboard (pip extra: tracking).")
    mlflow: MlflowConfig | None = Field(
        None, description="Log the run to MLflow: params (the resolved scenario, flattened), "
        "metrics per round, the run folder as artifacts (pip extra: tracking); None = off.")


class Scenario(Section):
    """A whole scenario file."""

    name: str = Field("scenario", description="Run name (folder runs/<name>/...).")
    description: str = Field("", description="Free text.")
    seed: int = Field(
        0, ge=0,
        description="Root seed: every random stream derives from (seed, purpose, round, client).")
    method: str | None = Field(None, description="Named method preset (fedsam, fedasam, "
                               "fedsam_swa, fedasam_swa, mofedsam, fedgamma, "
                               "fedsmoo, fedlesam, scaffold, fedprox, feddyn, fedadam, fedyogi, "
                               "fedadagrad): fills client.oracle, client.correction, "
                               "server.optimizer/lr/fedopt and server.swa; keys you set win.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)
    comm: CommConfig = Field(default_factory=CommConfig)
    system: SystemConfig = Field(default_factory=SystemConfig)
    topology: TopologyConfig = Field(default_factory=TopologyConfig)
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)



def cross_checks(sc: Scenario) -> list[tuple[str, str]]:
    """Checks that involve several keys: (key path, message) for each failure."""
    errors: list[tuple[str, str]] = []
    n = sc.data.num_clients
    errors.extend(topology_checks(sc))  # first: a graph run refuses server keys by name
    errors.extend(personalization_checks(sc))
    errors.extend(adversarial_checks(sc))
    errors.extend(zeroth_order_checks(sc))
    errors.extend(diff2_checks(sc))
    if sc.server.clients_per_round > n and sc.topology.kind == "none":
        errors.append(("server.clients_per_round",
                       f"clients_per_round = {sc.server.clients_per_round} exceeds "
                       f"data.num_clients = {n}"))
    if sc.client.local_epochs is None and sc.client.local_steps is None:
        errors.append(("client.local_epochs", "set local_epochs or local_steps"))
    if sc.data.partition.method == "natural" and sc.data.dataset in (
            "digits", "mnist", "fashion_mnist", "cifar10"):
        errors.append(("data.partition.method",
                       f"dataset {sc.data.dataset!r} has no natural clients; choose one of "
                       + ", ".join(LABEL_PARTITIONS)))
    for check in (check_aggregation(sc.server.aggregation, sc.server.clients_per_round),
                  check_attack(sc.attack, n)):
        if check:  # messages start with the full key path
            key, _, msg = check.partition(": ")
            errors.append((key, msg))
    pv = sc.privacy
    if pv.user_level.enabled:
        problem = delta_problem(pv.user_level.delta, n, "clients (data.num_clients)")
        if problem:
            errors.append(("privacy.user_level.delta", problem))
    if pv.sample_level.enabled:  # against the data's size once it is built (preflight)
        problem = delta_problem(pv.sample_level.delta, None, "training examples")
        if problem:
            errors.append(("privacy.sample_level.delta", problem))
    if pv.user_level.enabled:
        if sc.server.sampling != "poisson":
            errors.append(("server.sampling", "user-level DP is accounted for Poisson client "
                           "sampling (each client with rate q); set server.sampling: poisson"))
        if (sc.server.aggregation.rule != "mean" or sc.server.aggregation.bucket_size
                or sc.server.aggregation.pre):
            errors.append(("server.aggregation.rule", "user-level DP replaces the aggregation "
                           "rule by the clipped noisy sum; robust rules are not differentially "
                           "private here"))
        if sc.system.asynchronous is not None:
            errors.append(("system.asynchronous",
                           "user-level DP is not accounted for asynchronous rounds"))
        if (pv.user_level.noise_placement == "client"
                and sc.server.aggregation.weighting != "uniform"):
            # N(0, σ²C²/m) per client is σ on a uniform mean only; weighted by n_i the
            # heaviest client's multiplier is σ·√(Σw²)/(√m·w_max) < σ (ε under-reported).
            errors.append(("server.aggregation.weighting",
                           "privacy.user_level.noise_placement: client adds noise calibrated "
                           "for a uniform mean; set server.aggregation.weighting: uniform "
                           f"(got {sc.server.aggregation.weighting!r})"))
        if sc.model.norm == "batch" and sc.model.bn_aggregation == "average":
            errors.append(("model.norm", "with bn_aggregation: average the clients' BatchNorm "
                           "statistics reach the server unclipped and unnoised, outside the DP "
                           "guarantee; use norm: group (GroupNorm) or model.bn_aggregation: local"))
    if pv.sample_level.enabled:
        if sc.model.norm == "batch":
            errors.append(("model.norm", "BatchNorm mixes examples of a batch, which DP-SGD cannot "
                           "bound; use norm: group (GroupNorm)"))
        if sc.client.oracle.name != "sgd":
            # The DP mechanism replaces the oracle; SAM-like oracles have a private version.
            sam_like = sc.client.oracle.name in ("sam", "asam", "sam_on", "fisher_sam", "lesam",
                                                 "gam", "fedsmoo")
            hint = ("set privacy.sample_level.mechanism: dp_sam (SAM's two passes, both "
                    "private)" if sam_like else "choose privacy.sample_level.mechanism")
            errors.append(("client.oracle.name", f"with sample-level DP the oracle is the DP "
                           f"mechanism ({', '.join(DP_MECHANISM_CONFIGS)}), not "
                           f"{sc.client.oracle.name!r}: {hint}"))
    if sc.system.asynchronous is not None:
        if sc.system.asynchronous.buffer_size > n:
            errors.append(("system.asynchronous.buffer_size",
                           f"buffer_size exceeds data.num_clients = {n}"))
        if sc.comm.downlink.error_feedback:
            errors.append(("comm.downlink.error_feedback",
                           "downlink error feedback needs one model per round; not "
                           "available in asynchronous mode"))
    errors.extend(vectorize_checks(sc))
    errors.extend(resource_checks(sc))
    if sc.data.dataset == "synthetic" and sc.data.partition.method != "natural":
        errors.append(("data.partition.method",
                       "synthetic data is generated per device: use method 'natural'"))
    return errors
