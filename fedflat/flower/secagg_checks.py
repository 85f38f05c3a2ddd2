"""SecAgg+ scenario checks, free of flwr: what cannot run under SecAgg+, by key.

Shared by the SecAgg+ path (:mod:`fedflat.flower.secagg`), the plain ServerApp
(:mod:`fedflat.flower.server_app`), ``fedflat flower simulate`` and ``fedflat flower app``,
which refuse such a scenario before anything starts; kept apart so that the ServerApp need
not import the SecAgg+ module (which imports it back).
"""

from __future__ import annotations

from fedflat.errors import ScenarioError
from fedflat.scenario.flower import SECAGG_MODULUS_RANGE, FlowerConfig
from fedflat.scenario.loader import LoadedScenario
from fedflat.scenario.schema import Scenario

SERVER_SIDE_ATTACKS = ("sign_flip", "scaling", "alie", "ipm")


# ---------------------------------------------------------------------- scenario checks
def flower_config(sc: Scenario) -> FlowerConfig:
    """The scenario's ``flower`` block, or the defaults when the schema has none."""
    block = getattr(sc, "flower", None)
    if block is None:
        return FlowerConfig()
    if isinstance(block, FlowerConfig):
        return block
    return FlowerConfig.model_validate(block.model_dump() if hasattr(block, "model_dump")
                                       else dict(block))


def secagg_refusals(sc: Scenario) -> list[tuple[str, str]]:
    """(key path, reason) for every scenario feature that cannot run under SecAgg+."""
    out: list[tuple[str, str]] = []
    agg = sc.server.aggregation
    if agg.rule != "mean":
        out.append(("server.aggregation.rule",
                    f"rule {agg.rule!r} needs the individual client updates, which SecAgg+ "
                    "hides; only 'mean' (with any server optimizer) runs under SecAgg+"))
    if getattr(agg, "bucket_size", None):
        out.append(("server.aggregation.bucket_size",
                    "bucketing averages subsets of individual updates; SecAgg+ gives only the "
                    "cohort's mean"))
    if sc.attack.kind in SERVER_SIDE_ATTACKS:
        out.append(("attack.kind",
                    f"attack {sc.attack.kind!r} is simulated on the server from the individual "
                    "deltas; under SecAgg+ only 'label_flip' (client-side) can run"))
    if sc.model.norm == "batch":
        out.append(("model.norm",
                    "BatchNorm statistics travel next to the masked sum: averaged (bn_aggregation "
                    "average) each client's would reach the server in the clear, and kept "
                    "locally they need the client state SecAgg+ rounds do not carry; use "
                    "norm: group"))
    user = sc.privacy.user_level
    if user.enabled:
        if user.noise_placement == "server":
            out.append(("privacy.user_level.enabled",
                        "user-level DP with server noise clips each client's delta on the "
                        "server, which needs the individual norms that SecAgg+ hides"))
        else:
            out.append(("privacy.user_level.noise_placement",
                        "client-side user-level noise (DP-FedSAM) runs on the nodes, but "
                        "fedflat has not validated it under SecAgg+'s quantised sum; run it "
                        "without secagg"))
    corr, oracle = sc.client.correction, sc.client.oracle
    uplink_extras = [name for name, on in (
        ("client.correction.scaffold", corr.scaffold),
        ("client.correction.feddyn_alpha", corr.feddyn_alpha is not None),
        ("client.correction.mofedsam_alpha", corr.mofedsam_alpha is not None),
        ("client.oracle.name", oracle.name == "fedsmoo"),
    ) if on]
    for key in uplink_extras:
        out.append((key, "this local rule keeps per-client state and sends per-client uplink "
                    "extras (SCAFFOLD c_i, FedDyn g_i, FedSMOO mu_i, MoFedSAM K*lr) that "
                    "SecAgg+ does not aggregate; run it without secagg"))
    if sc.comm.uplink.codec != "fp32":
        out.append(("comm.uplink.codec",
                    f"uplink codec {sc.comm.uplink.codec!r} is lossy compression of an "
                    "individual delta; SecAgg+ quantises and masks dense vectors itself: use "
                    "'fp32'"))
    if sc.system.asynchronous is not None:
        out.append(("system.asynchronous",
                    "SecAgg+ sums one synchronous cohort; asynchronous (buffered) rounds "
                    "cannot run under it"))
    if sc.server.sampling == "uniform" and sc.server.clients_per_round < 2:
        out.append(("server.clients_per_round",
                    "SecAgg+ needs at least 2 clients per round to hide an update"))
    fc = flower_config(sc)
    cohort = sc.server.clients_per_round if sc.server.sampling == "uniform" \
        else sc.data.num_clients
    if cohort * fc.secagg_quantization_range >= SECAGG_MODULUS_RANGE:
        out.append(("flower.secagg_quantization_range",
                    f"{cohort} clients x quantization_range {fc.secagg_quantization_range} "
                    f"reaches the mask modulus 2^32: lower the range"))
    return out


def check_secagg(sc: Scenario | LoadedScenario, *, file: str = "scenario") -> None:
    """Refuse a scenario that cannot run under SecAgg+, naming every offending key.

    Args:
        sc: the scenario; a ``LoadedScenario`` locates the error at the first key's line.
        file: where a bare ``Scenario`` came from (for the message).

    Raises:
        ScenarioError: located at the first offending key; the message lists all.
    """
    scenario = sc.scenario if isinstance(sc, LoadedScenario) else sc
    bad = secagg_refusals(scenario)
    if bad:
        message = "cannot run under SecAgg+ (flower.secagg): " + "; ".join(
            f"{key}: {why}" for key, why in bad)
        if isinstance(sc, LoadedScenario):
            raise sc.error(bad[0][0], message)
        raise ScenarioError(message, file=file, key=bad[0][0])
