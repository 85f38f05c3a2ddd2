"""The ``client.zeroth_order:`` block: gradient-free clients (two-point estimators).

Example::

    client:
      zeroth_order:
        enabled: true
        estimator: gaussian   # gaussian | sphere
        queries: 20           # directions q per local step (q + 1 loss evaluations)
        mu: 0.001             # smoothing μ
        uplink: seeds         # seeds = per-step seed + q scalars; vector = the delta

Definitions, citations and pitfalls: ``fedflat.client.zeroth_order``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario


class ZerothOrderConfig(BaseModel):
    """Zeroth-order local steps (``enabled``) replacing the oracle's gradient."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    enabled: bool = Field(
        False, description="Replace the local gradient by a two-point random-direction "
        "estimate from loss evaluations only (Nesterov & Spokoiny 2017).")
    estimator: Literal["gaussian", "sphere"] = Field(
        "gaussian", description="Directions: 'gaussian' u ~ N(0, I), ĝ = mean c·u; 'sphere' u "
        "uniform on the unit sphere, ĝ = d · mean c·u.")
    queries: int = Field(
        10, ge=1, description="Directions q per local step (each step costs q + 1 loss "
        "evaluations, logged as client/zo_queries per client and round).")
    mu: float = Field(1e-3, gt=0, description="Smoothing radius μ (parameter units).")
    uplink: Literal["vector", "seeds"] = Field(
        "vector", description="'vector' = the delta goes up as usual; 'seeds' = per local step "
        "one seed (8 bytes) and q fp32 scalars, the server replays the update (exact, bit for "
        "bit).")


def zeroth_order_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting zeroth-order clients cannot run with."""
    z = sc.client.zeroth_order
    if not z.enabled:
        return []
    errors: list[tuple[str, str]] = []
    why = "client.zeroth_order.enabled"
    if sc.runtime.backend == "vmap" or sc.runtime.vectorize:
        engine = ("runtime.backend: vmap" if sc.runtime.backend == "vmap"
                  else "runtime.vectorize: true")
        errors.append((why, f"zeroth-order clients are not supported by {engine}; use "
                       "runtime.backend serial or ray"))
    if sc.client.oracle.name != "sgd":
        errors.append(("client.oracle.name", f"{why}: the zeroth-order estimate replaces the "
                       "oracle; use oracle sgd"))
    if sc.privacy.sample_level.enabled:
        errors.append(("privacy.sample_level.enabled", f"{why}: DP-SGD clips per-example "
                       "gradients a zeroth-order client does not have"))
    if sc.adversarial.enabled:
        errors.append(("adversarial.enabled", f"{why}: PGD needs input gradients"))
    if z.uplink == "seeds":
        why = "client.zeroth_order.uplink is 'seeds'"
        c = sc.client.correction
        if any(v not in (None, False, "none", 0, 0.0) for v in c.model_dump().values()):
            errors.append(("client.correction", f"{why}: the server replays the local "
                           "optimizer alone; corrections change the delta"))
        if sc.client.grad_clip is not None:
            errors.append(("client.grad_clip", f"{why}: remove grad_clip"))
        if sc.comm.uplink.codec != "fp32":
            errors.append(("comm.uplink.codec", f"{why}: the message replaces the uplink "
                           "codec; use fp32"))
        if sc.comm.downlink.codec != "fp32":
            errors.append(("comm.downlink.codec", f"{why}: the server replays from its exact "
                           "model; use fp32"))
        if sc.model.norm == "batch":
            errors.append(("model.norm", f"{why}: BatchNorm statistics are not in the "
                           "message; use norm: group or layer"))
        if sc.privacy.user_level.enabled:
            errors.append(("privacy.user_level.enabled", f"{why}: the clipped noisy delta "
                           "cannot be replayed from seeds"))
        if sc.system.asynchronous is not None:
            errors.append(("system.asynchronous", f"{why}: synchronous rounds only"))
        if sc.topology.kind != "none":
            errors.append(("topology.kind", f"{why}: gossip sends models, not updates a "
                           "server could replay; use uplink: vector"))
        if sc.runtime.backend == "ray" and sc.runtime.num_gpus > 0:
            errors.append(("runtime.num_gpus", f"{why}: the server rebuilds the directions "
                           "on CPU; train on CPU"))
    return errors
