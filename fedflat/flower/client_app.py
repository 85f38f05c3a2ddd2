"""fedflat's Flower ClientApp: a SuperNode runs fedflat's own client update.

A node holds one client of the scenario. Which one, and where its data comes from, is set
by the node's ``node_config``:

* ``partition-id = k`` (the simulation engine sets it; a real SuperNode gets it from
  ``--node-config "partition-id=k"``): the node builds the scenario's federated data itself
  (synthetic data is regenerated from the seed; file datasets are read from the node's
  ``data-dir``, else the scenario's ``data.data_dir`` if that folder exists on the node,
  else the node's ``$FEDFLAT_DATA``) and trains client ``k``'s samples.
* ``data-path = "/path/file.pt"`` (or ``.npz``) together with ``partition-id = k``: the node
  trains on its own local samples instead, a file holding ``x`` (float inputs), ``y``
  (int64 labels) and ``num_classes``; client ``k`` is then the name the server knows it by.
* optional ``device`` ("cpu", "cuda") and ``threads`` (torch threads).

The node answers two message types: ``query`` (which partition it holds; the server maps
node ids to client ids with it) and ``train`` (one ``ClientJob``: the payload, the client's
state and the resolved scenario arrive in the message, the ``ClientResult`` goes back).
The ``ClientWorker`` (model, data, local rule, uplink chain) is built once per process and
scenario and cached, exactly as a Ray client actor keeps it resident. The reply's delta is
what the worker's uplink chain returns: with DP-FedSAM's client-side noise it is clipped,
noised and encoded on the node, so no raw delta leaves it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedflat.data.datasets import DATA_ENV, Dataset
from fedflat.errors import DataError, FedflatError
from fedflat.flower import messages
from fedflat.runtime.build import FederatedData, build_data
from fedflat.runtime.worker import ClientWorker
from fedflat.scenario.loader import load_scenario
from fedflat.scenario.schema import Scenario

PARTITION_KEY = "partition-id"
DATA_DIR_KEY = "data-dir"
DATA_PATH_KEY = "data-path"
DEVICE_KEY = "device"
THREADS_KEY = "threads"


class FlowerClientError(FedflatError):
    """A node that cannot serve the job it was sent (routing, data or version problem)."""


@dataclass(frozen=True)
class ClientSettings:
    """Defaults a ClientApp applies when the node's ``node_config`` does not set them.

    Attributes:
        threads: torch threads of the worker (the simulation sets it from the CPUs each
            virtual client gets); None = ``runtime.threads`` of the scenario.
        device: "cpu" or "cuda"; None = cuda when ``runtime.num_gpus > 0`` and available.
    """

    threads: int | None = None
    device: str | None = None


# One worker per (scenario, data source, device, threads) and process: a Ray actor of the
# simulation engine, or a SuperNode's ClientApp process, builds model and data only once.
_WORKERS: dict[tuple[str, str, str, int | None], ClientWorker] = {}
_SCENARIOS: dict[str, Scenario] = {}
_LOCK = threading.Lock()


def node_partition(ctx: Context) -> int | None:
    """The client id this node holds, from ``node_config['partition-id']`` (None: unset)."""
    raw = ctx.node_config.get(PARTITION_KEY)
    if raw is None:
        return None
    try:
        pid = int(raw)
    except (TypeError, ValueError):
        raise FlowerClientError(
            f"node_config {PARTITION_KEY} = {raw!r} is not an integer") from None
    if pid < 0:
        raise FlowerClientError(f"node_config {PARTITION_KEY} must be >= 0, got {pid}")
    return pid


def load_local_data(path: str | Path, client_id: int, num_clients: int) -> FederatedData:
    """A node's own samples as a FederatedData in which only ``client_id`` holds data.

    The other ``num_clients - 1`` clients are empty, so that everything indexed by client id
    (the Byzantine set of a label-flip attack, say) is the same as on the server.

    Args:
        path: a ``.pt`` file (``torch.save({"x": ..., "y": ..., "num_classes": C})``) or an
            ``.npz`` file with arrays ``x``, ``y`` and ``num_classes``.
        client_id: the client id the server addresses this node by.
        num_clients: ``data.num_clients`` of the scenario.

    Raises:
        FlowerClientError: a missing or malformed file.
    """
    p = Path(path)
    if not p.is_file():
        raise FlowerClientError(f"node_config {DATA_PATH_KEY}: no file {p}")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                blob: dict[str, Any] = {k: z[k] for k in z.files}
        else:
            blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FlowerClientError(f"node_config {DATA_PATH_KEY}: cannot read {p}: {exc}") from None
    missing = {"x", "y", "num_classes"} - set(blob)
    if missing:
        raise FlowerClientError(f"{p} lacks {sorted(missing)} (expected x, y, num_classes)")
    x = torch.as_tensor(blob["x"], dtype=torch.float32)
    y = torch.as_tensor(blob["y"], dtype=torch.int64)
    if x.shape[0] != y.shape[0] or y.ndim != 1:
        raise FlowerClientError(f"{p}: x has {x.shape[0]} rows, y has shape {tuple(y.shape)}")
    num_classes = int(np.asarray(blob["num_classes"]).item())
    ds = Dataset(name=f"local:{p.name}", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0],
                 num_classes=num_classes, in_shape=tuple(x.shape[1:]), train_groups=None,
                 test_groups=None)
    if not 0 <= client_id < num_clients:
        raise FlowerClientError(f"{PARTITION_KEY} = {client_id} is outside the scenario's "
                                f"data.num_clients = {num_clients}")
    indices = [np.zeros(0, dtype=np.int64)] * num_clients
    indices[client_id] = np.arange(len(y), dtype=np.int64)
    return FederatedData(ds, indices)


def scenario_of(instr: messages.TrainInstruction) -> Scenario:
    """The scenario a train message carries, parsed once per process and digest."""
    sc = _SCENARIOS.get(instr.scenario_sha256)
    if sc is None:
        try:
            data = yaml.safe_load(instr.scenario_yaml)
        except yaml.YAMLError as exc:
            raise FlowerClientError(f"the server sent an unreadable scenario: {exc}") from None
        sc = _SCENARIOS[instr.scenario_sha256] = load_scenario(data).scenario
    return sc


def node_data_dir(ctx: Context, scenario_dir: str | None) -> str | None:
    """Where this node finds dataset files, if not at the scenario's ``data.data_dir``.

    ``node_config['data-dir']`` wins; else the node's ``$FEDFLAT_DATA`` when the scenario's
    folder (a path on the server) does not exist here; else None (use the scenario's).
    """
    explicit = ctx.node_config.get(DATA_DIR_KEY)
    if explicit:
        return str(explicit)
    env = os.environ.get(DATA_ENV)
    if env and not (scenario_dir and Path(scenario_dir).is_dir()):
        return env
    return None


def get_worker(instr: messages.TrainInstruction, ctx: Context,
               settings: ClientSettings) -> ClientWorker:
    """The cached worker for this node and scenario (built on first use).

    Raises:
        FlowerClientError: the node cannot load its data.
    """
    data_path = ctx.node_config.get(DATA_PATH_KEY)
    threads_raw = ctx.node_config.get(THREADS_KEY, settings.threads)
    device_raw = ctx.node_config.get(DEVICE_KEY, settings.device)
    with _LOCK:
        sc = scenario_of(instr)
        data_dir = node_data_dir(ctx, sc.data.data_dir)
        source = f"path:{data_path}" if data_path else f"dir:{data_dir}"
        key = (instr.scenario_sha256, source, str(device_raw),
               None if threads_raw is None else int(threads_raw))
        worker = _WORKERS.get(key)
        if worker is None:
            threads = key[3] if key[3] is not None else sc.runtime.threads
            if device_raw is not None:
                device = str(device_raw)
            else:
                device = "cuda" if sc.runtime.num_gpus > 0 and torch.cuda.is_available() else "cpu"
            if data_path:
                fed = load_local_data(str(data_path), instr.job.client_id, sc.data.num_clients)
            else:
                if data_dir is not None:
                    data = sc.data.model_copy(update={"data_dir": data_dir})
                    sc = sc.model_copy(update={"data": data})
                try:
                    fed = build_data(sc)
                except DataError as exc:
                    raise FlowerClientError(
                        f"node cannot load {sc.data.dataset!r} (data_dir {sc.data.data_dir!r}): "
                        f"{exc}; give the node --node-config 'data-dir=\"/path\"' or "
                        f"${DATA_ENV}") from None
            worker = ClientWorker(sc, fed, device=device, threads=threads)
            _WORKERS[key] = worker
    return worker


def handle_train(msg: Message, ctx: Context, settings: ClientSettings) -> Message:
    """Run one client update and reply with its ClientResult.

    Raises:
        FlowerClientError: the job is for another client than the node holds, or the
            node's model does not match the server's parameter vector. Flower turns the
            exception into an error reply that the server reports.
    """
    instr = messages.decode_instruction(msg.content)
    pid = node_partition(ctx)
    if pid is None:
        raise FlowerClientError(f"this node has no node_config {PARTITION_KEY}; it cannot "
                                f"train client {instr.job.client_id}")
    if pid != instr.job.client_id:
        raise FlowerClientError(f"node holds partition {pid} but was sent the job of client "
                                f"{instr.job.client_id}")
    worker = get_worker(instr, ctx, settings)
    if worker.model.num_params != instr.payload.params.numel():
        raise FlowerClientError(f"the node's model has {worker.model.num_params} parameters, "
                                f"the server's {instr.payload.params.numel()}: the node's data "
                                "has another input shape or number of classes")
    nb = instr.payload.buffers.numel()
    if nb and nb != worker.model.num_buffers:
        raise FlowerClientError(f"the node's model has {worker.model.num_buffers} BatchNorm "
                                f"statistics, the server sent {nb}")
    if instr.job.client_id >= len(worker.client_data):
        raise FlowerClientError(f"client {instr.job.client_id} is outside this node's "
                                f"{len(worker.client_data)} partitions")
    [res] = worker.run(instr.payload, [instr.job], [instr.state])
    return Message(messages.encode_result(res), reply_to=msg)


def handle_query(msg: Message, ctx: Context) -> Message:
    """Reply with the partition id this node holds (-1 when it has none)."""
    return Message(messages.encode_node_info(node_partition(ctx)), reply_to=msg)


def make_client_app(settings: ClientSettings | None = None) -> ClientApp:
    """A ClientApp running fedflat's client update (Flower Message API).

    Args:
        settings: defaults for threads and device (node_config overrides them).
    """
    s = settings or ClientSettings()
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, ctx: Context) -> Message:
        return handle_train(msg, ctx, s)

    @client_app.query()
    def query(msg: Message, ctx: Context) -> Message:
        return handle_query(msg, ctx)

    return client_app


# The component `flwr run` loads on SuperNodes ([tool.flwr.app.components] clientapp).
app = make_client_app()
