"""The ``topology:`` block: decentralized (gossip) training without a server.

Example::

    topology:
      kind: torus            # ring | torus | erdos_renyi | exponential | complete | random_matching
      mixing: metropolis_hastings
      gossip_steps: 1
      local_steps: 1         # D-SGD; more = local-steps gossip
      compression: {codec: top_k, ratio: 0.1}   # CHOCO-SGD
      gamma: 0.2                                # CHOCO's consensus step size

Every one of the ``data.num_clients`` nodes trains every round with the ordinary local
rule (``client.*``: SGD / SAM family / DP-SGD per node via ``privacy.sample_level``), then
gossips with its neighbours (definitions in ``fedflat.decentralized.topology`` and
``fedflat.decentralized.gossip``). There is no server: keys that configure one are
refused by ``topology_checks`` with the key named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedflat.scenario.comm import CodecSpec

if TYPE_CHECKING:
    from fedflat.scenario.schema import Scenario


class TopologyConfig(BaseModel):
    """Decentralized training on a graph (``kind: none`` = the usual server)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    kind: Literal["none", "ring", "torus", "erdos_renyi", "exponential", "complete",
                  "random_matching"] = Field(
        "none", description="Communication graph of decentralized training (no server); "
        "'none' = federated with a server. ring: i ~ i±1; torus: rows × cols 2-D torus; "
        "erdos_renyi: G(n, p) redrawn until connected; exponential: i ~ i±2^k (undirected); "
        "complete; random_matching: a new random matching every gossip step.")
    p: float = Field(0.3, gt=0, le=1, description="erdos_renyi: edge probability p.")
    rows: int | None = Field(
        None, ge=3, description="torus: rows (divides data.num_clients; cols = n / rows ≥ 3); "
        "None = the most square factorisation.")
    mixing: Literal["metropolis_hastings", "uniform"] = Field(
        "metropolis_hastings", description="Mixing weights: metropolis_hastings "
        "W_ij = 1/(1+max(d_i, d_j)); uniform 1/(d+1) (regular graphs only).")
    gossip_steps: int = Field(
        1, ge=1, description="Gossip (averaging) steps X ← W X after each round's local steps.")
    local_steps: int | None = Field(
        None, ge=1, description="Local steps per node per round (1 = D-SGD); sets "
        "client.local_steps (None = the client schedule).")
    compression: CodecSpec | None = Field(
        None, description="CHOCO-SGD (Koloskova et al. 2019): compress x_i − x̂_i with this "
        "codec (no error_feedback: x̂ is CHOCO's memory); None = exact fp32 gossip.")
    gamma: float = Field(
        1.0, gt=0, le=1, description="CHOCO consensus step size γ (with compression; "
        "1 = plain gossip for fp32, use ≪ 1 with a lossy codec).")


def topology_checks(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, message) for each setting that makes no sense without a server."""
    tp = sc.topology
    if tp.kind == "none":
        return []
    errors: list[tuple[str, str]] = []
    why = f"topology.kind is {tp.kind!r} (decentralized, no server)"
    n = sc.data.num_clients
    least = {"ring": 3, "torus": 9}.get(tp.kind, 2)
    if n < least:
        errors.append(("data.num_clients", f"{tp.kind} needs at least {least} nodes, got {n}"))
    if tp.kind == "torus" and tp.rows is not None and (n % tp.rows or n // tp.rows < 3):
        errors.append(("topology.rows", f"rows={tp.rows} must divide data.num_clients = {n} "
                       "with n / rows ≥ 3"))
    if tp.mixing == "uniform" and (tp.kind == "erdos_renyi"
                                   or (tp.kind == "random_matching" and n % 2)):
        errors.append(("topology.mixing", f"uniform weights need a regular graph; {tp.kind} "
                       f"with {n} nodes is not: use metropolis_hastings"))
    if tp.compression is not None and tp.compression.error_feedback:
        errors.append(("topology.compression.error_feedback", "CHOCO keeps its own memory "
                       "x̂ of what was not sent; error feedback does not apply"))
    if (tp.local_steps is not None and sc.client.local_steps is not None
            and tp.local_steps != sc.client.local_steps):
        errors.append(("topology.local_steps", f"{tp.local_steps} conflicts with "
                       f"client.local_steps = {sc.client.local_steps}; set one of them"))
    if sc.runtime.backend != "serial":
        errors.append(("runtime.backend", f"{why} runs on the serial backend only; "
                       f"set runtime.backend: serial"))
    s = sc.server
    agg = s.aggregation
    if agg.rule != "mean" or agg.pre or agg.bucket_size:
        errors.append(("server.aggregation.rule", f"{why}: there is no server aggregation "
                       "to make robust; remove server.aggregation"))
    if s.optimizer != "fedavg" or s.lr != 1.0:
        errors.append(("server.optimizer", f"{why}: there is no server optimizer; remove "
                       "server.optimizer / server.lr"))
    if s.swa.enabled:
        errors.append(("server.swa.enabled", f"{why}: SWA is a server step"))
    if s.sampling != "uniform":
        errors.append(("server.sampling", f"{why}: every node trains every round"))
    c = sc.client.correction
    needs_server = [name for name, on in (
        ("scaffold", c.scaffold), ("feddyn_alpha", c.feddyn_alpha is not None),
        ("mofedsam_alpha", c.mofedsam_alpha is not None)) if on]
    if needs_server:
        errors.append((f"client.correction.{needs_server[0]}", f"{why}: "
                       f"{', '.join(needs_server)} need(s) a server step"))
    if sc.client.oracle.name in ("fedsmoo", "lesam"):
        errors.append(("client.oracle.name", f"{why}: {sc.client.oracle.name} needs a server "
                       "step (a broadcast global correction)"))
    if sc.privacy.user_level.enabled:
        errors.append(("privacy.user_level.enabled", f"{why}: user-level DP protects a "
                       "server's aggregate; use privacy.sample_level (DP-SGD per node)"))
    if sc.attack.kind != "none":
        errors.append(("attack.kind", f"{why}: Byzantine attacks target the server's "
                       "aggregation; not simulated on a graph"))
    if sc.comm.uplink.codec != "fp32" or sc.comm.uplink.error_feedback \
            or sc.comm.downlink.codec != "fp32" or sc.comm.downlink.error_feedback:
        errors.append(("comm", f"{why}: there is no uplink or downlink; compress the gossip "
                       "messages with topology.compression (CHOCO-SGD)"))
    if sc.system.model_dump() != type(sc.system)().model_dump():
        errors.append(("system", f"{why}: the system model (speeds, deadlines, "
                       "availability, asynchrony) is not simulated on a graph; remove system"))
    if sc.model.norm == "batch":
        errors.append(("model.norm", f"{why}: BatchNorm statistics are not gossiped; "
                       "use norm: group or layer"))
    return errors
