"""fedflat's Flower ServerApp: fedflat's own server loop over a Flower ``Grid``.

The ServerApp uses no Flower strategy. Its main function loads the scenario (the resolved
YAML text of the run config, or the one ``fedflat flower simulate`` prepared) and runs
fedflat's driver, ``Runner.execute`` of :mod:`fedflat.runtime.run` (seeded cohorts from
``sample_cohort``, the system model, privacy planning, metrics.jsonl, checkpoints, plots,
summary.json), with fedflat's round (``round_loop.run_round``, a ``ServerCore`` in this
process) over a ``GridTransport``. At the first round the transport asks every node which
partition it holds (a ``query`` message) and maps client id -> node id; each round it sends
every job, with the client's persistent state and the scenario the Runner gives its
workers, to that client's node, and returns the replies in job order.

Because the cohorts, the client generators and the server pipeline are fedflat's, a Flower
run produces the same model as the serial backend for the same scenario and seed.

Run-config keys (``[tool.flwr.app.config]`` of the generated app, or ``flwr run
--run-config``): ``scenario`` (resolved YAML text, required), ``set`` (overrides,
``"server.rounds=5; seed=1"``), ``out-dir`` (run folder; "" = ``output.dir``/name/stamp),
``reply-timeout`` (seconds a round waits for replies; 0 = forever), ``node-timeout``
(seconds to wait for all clients' nodes), ``on-failure`` ("abort" or "drop"), ``secagg``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import yaml
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedflat.client.update import ClientResult
from fedflat.errors import FedflatError, ScenarioError
from fedflat.flower import messages
from fedflat.runtime.build import FederatedData
from fedflat.runtime.driver import Runner, RunResult, load_data, new_run_dir
from fedflat.runtime.preflight import preflight
from fedflat.runtime.round_loop import ClientState, LocalBackend, Mapped, Transport
from fedflat.runtime.server_core import ServerCore
from fedflat.runtime.worker import ClientJob, RoundPayload
from fedflat.scenario.diff2 import flower_problem
from fedflat.scenario.loader import LoadedScenario, dump_scenario, load_scenario
from fedflat.scenario.schema import Scenario

log = logging.getLogger("fedflat.flower")

FailurePolicy = Literal["abort", "drop"]


class FlowerRunError(FedflatError):
    """A Flower run that cannot go on: missing nodes, failed replies, refused features."""


@dataclass(frozen=True)
class ClientFailure:
    """One sampled client whose reply did not come back usable."""

    round: int
    client_id: int
    node_id: int
    reason: str

    def __str__(self) -> str:
        return f"round {self.round}, client {self.client_id} (node {self.node_id}): {self.reason}"


@dataclass
class ServerSettings:
    """What the ServerApp runs and how it treats the network.

    Attributes:
        scenario_yaml: the scenario text; None = ``run_config['scenario']``.
        overrides: ``key.path=value`` overrides applied on top.
        out: run folder; None = ``<output.dir>/<name>/<stamp>``.
        prepared: an already loaded scenario and its data (simulate builds them once,
            before the engine starts, so input errors surface before Ray does).
        reply_timeout_s: how long a round waits for its replies; None = forever.
        node_timeout_s: how long to wait until every client of the scenario has a node.
        poll_s: interval between pulls of replies.
        on_failure: "abort" (the run fails, naming each failed client) or "drop" (the
            round aggregates the replies that came back; failures go into metrics.jsonl).
        secagg: SecAgg+ requested (refused: see ``check_supported``).
        result: filled with the RunResult when the run ends (simulate reads it).
    """

    scenario_yaml: str | None = None
    overrides: Sequence[str] = ()
    out: str | Path | None = None
    prepared: tuple[LoadedScenario, FederatedData] | None = None
    reply_timeout_s: float | None = None
    node_timeout_s: float = 300.0
    poll_s: float = 0.05
    on_failure: FailurePolicy = "abort"
    secagg: bool = False
    result: dict[str, RunResult] = field(default_factory=dict)


def settings_from_run_config(run_config: Mapping[str, Any]) -> ServerSettings:
    """ServerSettings from a Flower run config (see the module docstring for the keys).

    Raises:
        FlowerRunError: no ``scenario`` key, or a value of the wrong kind.
    """
    text = run_config.get("scenario")
    if not isinstance(text, str) or not text.strip():
        raise FlowerRunError("the run config has no 'scenario' (the resolved scenario YAML); "
                             "generate the app with 'fedflat flower app SCENARIO DIR'")
    raw_set = str(run_config.get("set", "") or "")
    overrides = [s.strip() for s in raw_set.replace("\n", ";").split(";") if s.strip()]
    policy = str(run_config.get("on-failure", "abort"))
    if policy not in ("abort", "drop"):
        raise FlowerRunError(f"run config on-failure must be 'abort' or 'drop', got {policy!r}")
    reply = float(run_config.get("reply-timeout", 0.0))  # type: ignore[arg-type]
    out = str(run_config.get("out-dir", "") or "")
    return ServerSettings(
        scenario_yaml=text, overrides=overrides, out=out or None,
        reply_timeout_s=reply if reply > 0 else None,
        node_timeout_s=float(run_config.get("node-timeout", 300.0)),  # type: ignore[arg-type]
        poll_s=float(run_config.get("poll-interval", 0.2)),  # type: ignore[arg-type]
        on_failure=policy,  # type: ignore[arg-type]
        secagg=bool(run_config.get("secagg", False)),
    )


def check_supported(loaded: LoadedScenario, settings: ServerSettings) -> None:
    """Refuse what this ServerApp cannot run, naming the key.

    Per-client state (SCAFFOLD control variates, error-feedback residuals) is supported:
    it travels to the node in the train message and back in the reply.

    Raises:
        ScenarioError: SecAgg+ requested. It runs through :mod:`fedflat.flower.secagg`
            (``fedflat flower simulate --secagg``), not this ServerApp, whose pipeline sees
            each client's delta; a scenario SecAgg+ cannot run at all is refused with the
            keys that prevent it (robust rules need the individual updates).
    """
    if loaded.scenario.topology.kind != "none":  # a gossip run has no server to host
        raise ScenarioError("decentralized training (topology) has no server for Flower; run "
                            "it with 'fedflat run'", file="run config", key="topology.kind")
    if (diff2 := flower_problem(loaded.scenario)) is not None:
        raise ScenarioError(diff2[1], file="run config", key=diff2[0])
    block = getattr(loaded.scenario, "flower", None)  # a `flower:` scenario block, if any
    if settings.secagg or bool(getattr(block, "secagg", False)):
        from fedflat.flower.secagg_checks import check_secagg

        check_secagg(loaded.scenario, file="run config")
        raise ScenarioError(
            "SecAgg+ is not run by this ServerApp (it sends each client's delta in the "
            "clear); it runs through fedflat.flower.secagg: 'fedflat flower simulate "
            "--secagg' (flower.secagg: true)", file="run config", key="flower.secagg")


def prepare(settings: ServerSettings) -> tuple[LoadedScenario, FederatedData]:
    """The loaded scenario and its federated data (built here unless prepared)."""
    if settings.prepared is not None:
        return settings.prepared
    if settings.scenario_yaml is None:
        raise FlowerRunError("no scenario given")
    try:
        data = yaml.safe_load(settings.scenario_yaml)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"YAML syntax error: {exc}", file="run config scenario") from None
    loaded = load_scenario(data if isinstance(data, dict) else {}, list(settings.overrides))
    fed = load_data(loaded)
    preflight(loaded, fed)  # as `fedflat run`: what fails before round 0, before the folder
    return loaded, fed


# ---------------------------------------------------------------------- messaging
def send_and_receive(grid: Grid, messages: Sequence[Message], *, timeout_s: float | None,
                     poll_s: float) -> dict[str, Message]:
    """Push ``messages``, then pull replies until all came or ``timeout_s`` passed.

    Flower's own ``Grid.send_and_receive`` sleeps 3 s between pulls on a deployed
    SuperLink; this loop polls every ``poll_s`` instead.

    Returns:
        The replies keyed by the id of the message they answer (the grid writes that id
        into ``message.metadata.message_id`` when it pushes); a message the SuperLink did
        not accept, or that was not answered in time, has no entry.
    """
    pending = {i for i in grid.push_messages(messages) if i}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    replies: dict[str, Message] = {}
    while pending:
        for m in grid.pull_messages(pending):
            replies[m.metadata.reply_to_message_id] = m
            pending.discard(m.metadata.reply_to_message_id)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_s)
    return replies


def discover_nodes(grid: Grid, num_clients: int, *, timeout_s: float, poll_s: float,
                   query: Callable[[int], Message] | None = None,
                   read: Callable[[Message], int | None] | None = None) -> dict[int, int]:
    """Map each client id 0..num_clients-1 to the node whose partition-id equals it.

    Nodes are asked once each as they register; the call returns as soon as every client
    has a node. The Message API app asks with a ``query`` message (the defaults); SecAgg+'s
    legacy app passes its own ``get_properties`` message and reader.

    Args:
        query: node id -> the message that asks it for its partition.
        read: a reply -> its partition id (None: the node holds none); raises
            ``MessageError`` / ``KeyError`` / ``ValueError`` for a reply it cannot read.

    Raises:
        FlowerRunError: after ``timeout_s``, naming the missing client ids, the nodes that
            hold the same partition, and the nodes whose query failed.
    """
    if query is None:
        def query(node: int) -> Message:
            return Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
    if read is None:
        def read(reply: Message) -> int | None:
            return messages.decode_node_info(reply.content)
    deadline = time.monotonic() + timeout_s
    partition_of: dict[int, int | None] = {}
    failed: dict[int, str] = {}
    while True:
        new = [n for n in grid.get_node_ids() if n not in partition_of and n not in failed]
        if new:
            left = max(1.0, deadline - time.monotonic())
            sent = [query(n) for n in new]
            for r in send_and_receive(grid, sent, timeout_s=left, poll_s=poll_s).values():
                node = r.metadata.src_node_id
                if r.has_error():
                    failed[node] = f"error {r.error.code}: {r.error.reason}"
                    continue
                try:
                    partition_of[node] = read(r)
                except (messages.MessageError, KeyError, ValueError) as exc:
                    failed[node] = str(exc)
            for n in new:
                if n not in partition_of and n not in failed:
                    failed[n] = "no reply to the partition query"
        holders: dict[int, list[int]] = {}
        for node, pid in partition_of.items():
            if pid is not None:
                holders.setdefault(pid, []).append(node)
        dupes = {pid: nodes for pid, nodes in holders.items() if len(nodes) > 1}
        if dupes:
            raise FlowerRunError("several nodes hold the same partition-id: " + "; ".join(
                f"partition {pid} on nodes {nodes}" for pid, nodes in sorted(dupes.items())))
        missing = [c for c in range(num_clients) if c not in holders]
        if not missing:
            extra = sorted(pid for pid in holders if pid >= num_clients)
            if extra:
                log.warning("nodes hold partitions %s beyond data.num_clients = %d; they are "
                            "never sampled", extra, num_clients)
            return {c: holders[c][0] for c in range(num_clients)}
        if time.monotonic() >= deadline:
            parts = [f"{len(partition_of)} node(s) answered; no node holds client(s) "
                     f"{_ranges(missing)} of data.num_clients = {num_clients}"]
            if failed:
                parts.append("failed queries: " + "; ".join(
                    f"node {n}: {why}" for n, why in sorted(failed.items())))
            raise FlowerRunError(f"after waiting {timeout_s:.0f} s for the nodes: "
                                 + ". ".join(parts) + ". Start one SuperNode per client with "
                                 "--node-config \"partition-id=K\".")
        time.sleep(max(poll_s, 0.1))


def _ranges(ids: Sequence[int]) -> str:
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


# ---------------------------------------------------------------------- transport
class GridTransport:
    """A fedflat transport whose clients are Flower nodes (see ``round_loop.Transport``).

    The Runner drives it through a ``LocalBackend`` (fedflat's round, a ``ServerCore`` in
    this process). The nodes are discovered at the first round (inside the Runner's loop,
    so a missing node fails the run with a summary.json that says why).
    """

    def __init__(self, grid: Grid, num_clients: int, scenario_yaml: str,
                 settings: ServerSettings, node_of: Mapping[int, int] | None = None) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.node_of = dict(node_of) if node_of is not None else None
        self.scenario_yaml = scenario_yaml
        self.scenario_sha = messages.scenario_digest(scenario_yaml)
        self.settings = settings
        self.failures: list[ClientFailure] = []
        self.discovery_seconds = 0.0

    def summary_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"node_discovery_seconds": self.discovery_seconds}
        if self.failures:
            facts["failed_replies"] = [str(f) for f in self.failures]
        return facts

    def connect(self) -> dict[int, int]:
        """Client id -> node id, discovered once (see ``discover_nodes``)."""
        if self.node_of is None:
            t = time.perf_counter()
            self.node_of = discover_nodes(self.grid, self.num_clients,
                                          timeout_s=self.settings.node_timeout_s,
                                          poll_s=self.settings.poll_s)
            self.discovery_seconds = time.perf_counter() - t
        return self.node_of

    def map_clients(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                    states: Sequence[ClientState]) -> Mapped:
        """Send every job, with its client's state, to that client's node; the replies in
        job order. A failed reply aborts the round or (``on_failure: drop``) is left out."""
        round_ = payload.round
        node_of = self.connect()
        if not jobs:
            return Mapped([])
        outgoing = []
        for job, state in zip(jobs, states, strict=True):
            content = messages.encode_instruction(payload, job, state, self.scenario_yaml,
                                                  self.scenario_sha)
            outgoing.append(Message(content, dst_node_id=node_of[job.client_id],
                                    message_type=MessageType.TRAIN, group_id=str(round_)))
        replies = send_and_receive(self.grid, outgoing, timeout_s=self.settings.reply_timeout_s,
                                   poll_s=self.settings.poll_s)
        # A client may appear twice in an asynchronous buffer: match replies by message.
        ordered = [replies.get(m.metadata.message_id) for m in outgoing]
        results, failures = self._collect(payload, jobs, ordered)
        record: dict[str, Any] = {}
        if failures:
            for f in failures:
                log.error("failed reply: %s", f)
            self.failures.extend(failures)
            if self.settings.on_failure == "abort":
                raise FlowerRunError(f"{len(failures)} of {len(jobs)} clients failed in round "
                                     f"{round_}: " + "; ".join(str(f) for f in failures))
            record = {"failed_clients": [f.client_id for f in failures],
                      "failures": [f.reason for f in failures]}
        return Mapped(results, record)

    def _collect(self, payload: RoundPayload, jobs: Sequence[ClientJob],
                 replies: Sequence[Message | None]
                 ) -> tuple[list[ClientResult | None], list[ClientFailure]]:
        """The results in job order (``replies[i]`` answers ``jobs[i]``); every job without
        a usable reply is None there and becomes a failure."""
        results: list[ClientResult | None] = []
        failures = []
        timeout = self.settings.reply_timeout_s
        node_of = self.connect()
        for job, r in zip(jobs, replies, strict=True):
            node = node_of[job.client_id]
            reason, res = None, None
            if r is None:
                reason = f"no reply within {timeout:.0f} s" if timeout else "no reply"
            elif r.has_error():
                reason = f"Flower error {r.error.code}: {(r.error.reason or '').strip()}"
            else:
                try:
                    res = messages.decode_result(r.content)
                except (messages.MessageError, KeyError, ValueError) as exc:
                    reason = f"unreadable reply: {exc}"
                else:
                    if res.client_id != job.client_id:
                        reason = f"reply is for client {res.client_id}"
                    elif res.delta.shape != payload.params.shape:
                        reason = (f"delta of shape {tuple(res.delta.shape)}, expected "
                                  f"{tuple(payload.params.shape)}")
                    elif res.buffers.shape != payload.buffers.shape:
                        reason = (f"{res.buffers.numel()} BatchNorm statistics, expected "
                                  f"{payload.buffers.numel()}")
            if reason is not None:
                failures.append(ClientFailure(payload.round, job.client_id, node, reason))
                res = None
            results.append(res)
        return results, failures


# ---------------------------------------------------------------------- main
def run_server(grid: Grid, settings: ServerSettings) -> RunResult:
    """The ServerApp's main: fedflat's driver loop with Flower nodes as clients.

    Runs ``Runner.execute`` of :mod:`fedflat.runtime.run` with a ``GridTransport`` in
    place of the serial/Ray transport, so the run folder is the one ``fedflat run`` writes
    (scenario.yaml, clients.json, metrics.jsonl, checkpoints/, final_model.pt, plots,
    summary.json); summary.json also says ``backend: flower`` and lists failed replies.

    Raises:
        ScenarioError: an invalid or unsupported scenario (nothing is written then).
        FlowerRunError: missing nodes, or failed replies under ``on_failure = "abort"``
            (summary.json then says ``status: failed`` and why).
    """
    return run_over_transport(
        settings, lambda loaded: check_supported(loaded, settings),
        # ``sc`` is the scenario the Runner hands its workers (privacy noise calibrated):
        # the nodes get exactly that text.
        lambda sc, fed: GridTransport(grid, fed.num_clients, dump_scenario(sc), settings))


class FlowerTransport(Transport, Protocol):
    """A transport over Flower nodes that also reports facts for summary.json."""

    def summary_facts(self) -> dict[str, Any]:
        """What summary.json says about this transport (node discovery, failures)."""
        ...


def run_over_transport(settings: ServerSettings, check: Callable[[LoadedScenario], None],
                       make_transport: Callable[[Scenario, FederatedData], FlowerTransport]
                       ) -> RunResult:
    """fedflat's driver (``Runner.execute``) and round over a Flower transport.

    ``check`` refuses a scenario before anything is written; ``make_transport(sc, fed)``
    builds the transport from the scenario the Runner hands its workers. The loop, privacy
    planning, checkpoints and summary stay the driver's; summary.json also says
    ``backend: flower`` and the transport's ``summary_facts``.
    """
    loaded, fed = prepare(settings)
    check(loaded)
    run_dir = new_run_dir(loaded.scenario, settings.out)
    runner = Runner(loaded, run_dir, fed)
    runner.write_static_files()
    runner.write_summary("running", backend="flower")
    made: list[FlowerTransport] = []

    def factory(sc: Scenario, fed_: FederatedData, params0: torch.Tensor) -> LocalBackend:
        core = ServerCore(sc, fed_, params0, threads=sc.runtime.threads)
        made.append(make_transport(sc, fed_))
        return LocalBackend(core, made[0])

    try:
        result = runner.execute(make_backend=factory)
    finally:
        _annotate_summary(run_dir, made[0].summary_facts() if made else {})
    result.summary = json.loads((run_dir / "summary.json").read_text())
    settings.result["run"] = result
    return result


def _annotate_summary(run_dir: Path, facts: Mapping[str, Any]) -> None:
    """Add the Flower facts to the summary.json the Runner wrote."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    summary["backend"] = "flower"
    summary.update(facts)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def make_server_app(settings: ServerSettings | None = None) -> ServerApp:
    """A ServerApp running fedflat's server loop.

    Args:
        settings: fixed settings (simulate); None = read them from the run config.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, settings or settings_from_run_config(context.run_config))

    return server_app


# The component `flwr run` loads on the SuperLink ([tool.flwr.app.components] serverapp).
app = make_server_app()
