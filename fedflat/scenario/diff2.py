"""The ``privacy.sample_level.diff2:`` block: DIFF2 as the sample-level DP mechanism.

Example::

    privacy:
      sample_level:
        enabled: true
        mechanism: diff2
        epsilon: 1.0          # or noise_multiplier: DP-GD's σ over server.rounds
        delta: 1.0e-5
        clip_norm: 1.0        # C1, per-record clip of full gradients
        diff2: {period: 10, clip_diff: 0.1, sigma_split: rdp_half}

DIFF2 (Murata & Suzuki, ICML 2023, arXiv 2302.03884; definitions and pitfalls in
``fedflat.privacy.diff2``) needs every client's full local gradient at every round and at
the previous global model, so it runs only where the scenario delivers exactly that: full
participation, one full-batch local SGD step, an exact (fp32) uplink and downlink and the
plain weighted mean. Everything else is refused here, naming the conflicting key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fedflat.scenario.schema import Scenario


class Diff2Block(BaseModel):
    """DIFF2's own keys (read only with ``privacy.sample_level.mechanism: diff2``)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    period: int = Field(
        10, ge=1, description="T (rounds): round r releases a full clipped gradient when r mod "
        "T = 0 and a clipped gradient difference otherwise; 1 = DP-GD.")
    clip_diff: float = Field(
        0.1, gt=0, description="C2: L2 bound of each record's gradient difference "
        "∇ℓ(x_r; z) − ∇ℓ(x_{r−1}; z) (clip_norm is C1, the bound of full gradients).")
    sigma_split: Literal["equal", "rdp_half"] = Field(
        "rdp_half", description="σ of the two kinds of release from DP-GD's σ (the noise "
        "multiplier given or calibrated for server.rounds full-batch releases): 'equal' = σ "
        "on both; 'rdp_half' = half of DP-GD's RDP on the ⌈R/T⌉ full releases and half on "
        "the others (σ1 = σ√(2K/R), σ2 = σ√(2(R−K)/R)), the paper's constant shares. Both "
        "spend exactly DP-GD's ε.")


def _on(sc: Scenario) -> bool:
    s = sc.privacy.sample_level
    return s.enabled and s.mechanism == "diff2"


def diff2_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting DIFF2 cannot run with."""
    if not _on(sc):
        return []
    why = "privacy.sample_level.mechanism is 'diff2'"
    s, c, srv = sc.privacy.sample_level, sc.client, sc.server
    errors: list[tuple[str, str]] = []

    def refuse(key: str, msg: str) -> None:
        errors.append((key, f"{why}: {msg}"))

    n = sc.data.num_clients
    if srv.sampling != "uniform" or srv.clients_per_round != n:
        refuse("server.clients_per_round", "every client takes part in every round (the "
               "estimator sums all records' gradient differences); set server.sampling: "
               f"uniform and server.clients_per_round: {n} (data.num_clients)")
    if c.local_steps not in (None, 1) or (c.local_steps is None and c.local_epochs != 1):
        refuse("client.local_steps", "one full-batch local step per round; set "
               "client.local_steps: 1 (or local_epochs: 1) and client.batch_size at least the "
               "largest client's records")
    if s.expected_batch_size is not None or s.sampling_rate is not None:
        key = ("privacy.sample_level.expected_batch_size" if s.expected_batch_size is not None
               else "privacy.sample_level.sampling_rate")
        refuse(key, "no subsampling (q = 1, every local record each round); remove it")
    if s.per_layer_clipping:
        refuse("privacy.sample_level.per_layer_clipping", "per-tensor clipping is not "
               "implemented for DIFF2; remove it")
    if c.optimizer != "sgd" or c.momentum or c.nesterov or c.weight_decay:
        refuse("client.optimizer", "the local step is x − η·release: plain sgd without "
               "momentum, nesterov or weight_decay")
    if c.grad_clip is not None:
        refuse("client.grad_clip", "the release is already clipped per record; remove it")
    if any(v not in (None, False, "none", 0, 0.0) for v in c.correction.model_dump().values()):
        refuse("client.correction", "corrections change the released gradient; remove them")
    agg = srv.aggregation
    if agg.rule != "mean" or agg.weighting != "samples" or agg.bucket_size or agg.pre:
        refuse("server.aggregation.rule", "v telescopes only through the plain mean weighted "
               "by samples ((1/N) Σ of the clients' releases); set rule: mean, weighting: "
               "samples, no pre-aggregators or buckets")
    if sc.attack.kind != "none":
        refuse("attack.kind", "Byzantine clients are not part of DIFF2's model")
    if sc.privacy.user_level.enabled:
        refuse("privacy.user_level.enabled", "user-level clipping of the deltas would break "
               "the estimator; use one of the two")
    for link in ("uplink", "downlink"):
        codec = getattr(sc.comm, link)
        if codec.codec != "fp32" or codec.error_feedback:
            refuse(f"comm.{link}.codec", "a lossy codec changes the release (uplink) or the "
                   "point of the gradients (downlink); use fp32")
    sy = sc.system
    if sy.asynchronous is not None:
        refuse("system.asynchronous", "synchronous rounds only")
    if sy.availability != 1.0 or sy.dropout or sy.deadline_s is not None \
            or sy.straggler_fraction:
        key = ("system.availability" if sy.availability != 1.0 else "system.dropout"
               if sy.dropout else "system.deadline_s" if sy.deadline_s is not None
               else "system.straggler_fraction")
        refuse(key, "every client must finish every round (no unavailability, dropout, "
               "deadline or stragglers)")
    if sc.runtime.backend == "vmap" or sc.runtime.vectorize:
        key = "runtime.backend" if sc.runtime.backend == "vmap" else "runtime.vectorize"
        refuse(key, "runs on the serial and ray backends (not vectorised)")
    if sc.flower.secagg:
        refuse("flower.secagg", "SecAgg+ is not supported with DIFF2")
    if sc.topology.kind != "none":
        refuse("topology.kind", "DIFF2 needs a server holding v (no gossip)")
    if sc.personalization.method != "none":
        refuse("personalization.method", "not supported with DIFF2")
    if sc.adversarial.enabled:
        refuse("adversarial.enabled", "adversarial training is not supported with DIFF2")
    return errors


def diff2_data_problem(sc: Scenario, client_sizes: Sequence[int]) -> tuple[str, str] | None:
    """(key, message) when a client's records do not fit in one local batch, else None."""
    if not _on(sc) or not len(client_sizes):
        return None
    largest = int(max(client_sizes))
    if sc.client.batch_size < largest:
        return ("client.batch_size", f"privacy.sample_level.mechanism is 'diff2': one local "
                f"step must use all of a client's records; client.batch_size = "
                f"{sc.client.batch_size} is below the largest client's {largest} records "
                f"(set it to at least {largest})")
    return None


def flower_problem(sc: Scenario) -> tuple[str, str] | None:
    """(key, message) refusing DIFF2 on the Flower front ends (not validated there)."""
    if not _on(sc):
        return None
    return ("privacy.sample_level.mechanism", "privacy.sample_level.mechanism 'diff2' is not "
            "supported by the Flower front ends (its equality with the serial run is not "
            "tested there); run it with 'fedflat run' (runtime.backend serial or ray)")
