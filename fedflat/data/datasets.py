"""Dataset registry: pooled train/test tensors plus optional natural clients.

Files are read from a data directory laid out as ``<data_dir>/<dataset>/<file>`` (see
each folder's SOURCE.md). The scenario key ``data.data_dir`` sets it, or the environment
variable ``FEDFLAT_DATA`` (:func:`resolve_data_dir`). Splitting the pooled training set
into clients is the partitioners' job (:mod:`fedflat.data.partition`); datasets with
natural clients (synthetic devices, FEMNIST writers) also return those groups.
"""

from __future__ import annotations

import inspect
import io
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedflat.data.synthetic import SyntheticDevices, generate_synthetic, synthetic_devices
from fedflat.errors import DataError
from fedflat.rng import numpy_rng

DATA_ENV = "FEDFLAT_DATA"
CACHE_ENV = "FEDFLAT_CACHE_DIR"  # the same variable as the privacy calibration cache

# Seed of the fixed train/test splits (digits, fashion_mnist): the same for every run
# seed, so that runs with different seeds are evaluated on the same test set.
SPLIT_SEED = 0

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_CIFAR_CACHE_VERSION = 1


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded dataset: pooled train/test tensors and optional natural client groups.

    Attributes:
        name: registry name.
        x_train: ``[n_train, *in_shape]`` float32.
        y_train: ``[n_train]`` int64.
        x_test: ``[n_test, *in_shape]`` float32.
        y_test: ``[n_test]`` int64.
        num_classes: number of classes.
        in_shape: shape of one input without the batch dimension.
        train_groups: natural clients as index arrays into ``x_train`` (synthetic
            devices, FEMNIST writers), or None when the dataset has no natural clients.
        test_groups: the same clients' indices into ``x_test`` (aligned with
            ``train_groups``), or None.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    in_shape: tuple[int, ...]
    train_groups: list[np.ndarray] | None
    test_groups: list[np.ndarray] | None


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The configured data directory, else ``$FEDFLAT_DATA``, else None."""
    if data_dir:
        return data_dir
    return os.environ.get(DATA_ENV) or None


def cache_dir() -> Path:
    """Folder of decoded-array caches.

    ``$FEDFLAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fedflat``, else ``~/.cache/fedflat``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedflat"


# ----------------------------------------------------------------------------------
# Loaders


def _load_synthetic(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """Synthetic(α, β) of FedProx (:func:`fedflat.data.synthetic.generate_synthetic`).

    ``num_clients`` is the number of devices; ``options`` are the keyword arguments of
    ``generate_synthetic``. No files are needed.
    """
    options = {k: v for k, v in options.items() if k != "on_demand"}  # load_synthetic_devices
    allowed = {
        p.name
        for p in inspect.signature(generate_synthetic).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"data.synthetic: unknown option(s) {unknown}; allowed: {sorted(allowed)}"
        )
    data = generate_synthetic(numpy_rng(seed, "data"), num_clients, **options)
    return Dataset(
        name="synthetic",
        x_train=torch.from_numpy(data.x_train),
        y_train=torch.from_numpy(data.y_train),
        x_test=torch.from_numpy(data.x_test),
        y_test=torch.from_numpy(data.y_test),
        num_classes=int(options.get("num_classes", 10)),
        in_shape=(data.x_train.shape[1],),
        train_groups=data.train_groups,
        test_groups=data.test_groups,
    )


def load_synthetic_devices(
    seed: int, num_clients: int, options: dict[str, Any]
) -> tuple[Dataset, SyntheticDevices]:
    """``data.synthetic.on_demand``: a Dataset without pooled examples (empty arrays, no
    groups) and the devices that generate each client's examples when it is sampled.

    Raises:
        ValueError: unknown or out-of-range options.
    """
    options = {k: v for k, v in options.items() if k != "on_demand"}
    allowed = {p.name for p in inspect.signature(synthetic_devices).parameters.values()
               if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"data.synthetic: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    devices = synthetic_devices(seed, num_clients, **options)
    d = devices.options["num_features"]
    empty_x, empty_y = torch.zeros(0, d), torch.zeros(0, dtype=torch.int64)
    ds = Dataset(name="synthetic", x_train=empty_x, y_train=empty_y, x_test=empty_x,
                 y_test=empty_y, num_classes=int(devices.options["num_classes"]), in_shape=(d,),
                 train_groups=None, test_groups=None)
    return ds, devices


class OnDemandClients(Sequence[tuple[Tensor, Tensor]]):
    """Client k's training ``(x, y)``, generated when asked for (a few recent ones cached:
    a chunk asks for its clients more than once)."""

    def __init__(self, devices: SyntheticDevices, device: torch.device | str = "cpu",
                 cache: int = 256) -> None:
        self.devices = devices
        self.device = torch.device(device)
        self._get = lru_cache(maxsize=cache)(self._make)

    def _make(self, k: int) -> tuple[Tensor, Tensor]:
        x, y, _, _ = self.devices.device(k)
        return torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)

    def __len__(self) -> int:
        return self.devices.num_devices

    def __getitem__(self, k):  # type: ignore[override]
        if not isinstance(k, (int, np.integer)):
            raise TypeError("OnDemandClients is indexed by one client id")
        if k < 0:
            k += len(self)
        return self._get(int(k))


def sample_devices(devices: SyntheticDevices, split: str, max_samples: int,
                   rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """A fixed-size evaluation sample: the ``split`` ("train"/"test") examples of devices
    taken in a random order until ``max_samples`` are gathered (the last one cut), so its
    cost does not grow with the population."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    sizes = devices.train_sizes if split == "train" else devices.sizes - devices.train_sizes
    xs, ys, have = [], [], 0
    for k in rng.permutation(devices.num_devices):
        if have >= max_samples:
            break
        if not sizes[k]:
            continue
        x_tr, y_tr, x_te, y_te = devices.device(int(k))
        x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
        take = min(len(y), max_samples - have)
        xs.append(x[:take])
        ys.append(y[:take])
        have += take
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_digits(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images): ``[1, 8, 8]`` in [0, 1].

    The 80/20 train/test split is stratified by class and fixed (``SPLIT_SEED``),
    independent of the run seed. No files are needed.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = _fixed_split(y, 0.2, "digits")
    return _images("digits", x[train], y[train], x[test], y[test], 10)


def _load_mnist(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """MNIST 60k/10k from ``<data_dir>/mnist/mnist.npz``: ``[1, 28, 28]`` in [0, 1]."""
    arrays = _read_npz(
        "mnist", data_dir, "mnist/mnist.npz", ("x_train", "y_train", "x_test", "y_test")
    )
    return _images(
        "mnist",
        _to_unit(arrays["x_train"]),
        arrays["y_train"].astype(np.int64),
        _to_unit(arrays["x_test"]),
        arrays["y_test"].astype(np.int64),
        10,
    )


def _load_fashion_mnist(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """Fashion-MNIST from ``<data_dir>/fashion_mnist/fashion_mnist_test.npz``.

    Only the official **test** split (10,000 images) is vendored, so both our train and
    test sets come from it: a fixed (``SPLIT_SEED``), class-stratified 80/20 split, i.e.
    8,000 train and 2,000 test images, 800/200 per class. Numbers are therefore not
    comparable with results trained on the official 60k training set. ``[1, 28, 28]`` in
    [0, 1].
    """
    arrays = _read_npz(
        "fashion_mnist",
        data_dir,
        "fashion_mnist/fashion_mnist_test.npz",
        ("x_test", "y_test"),
    )
    x = _to_unit(arrays["x_test"])
    y = arrays["y_test"].astype(np.int64)
    train, test = _fixed_split(y, 0.2, "fashion_mnist")
    return _images("fashion_mnist", x[train], y[train], x[test], y[test], 10)


def _load_femnist(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """LEAF FEMNIST sample, one client per writer.

    Read from ``<data_dir>/femnist/femnist_leaf_niid005.npz``.

    Pixels are inverted (``255 - x``, MNIST polarity: ink high) and scaled to [0, 1],
    ``[1, 28, 28]``, 62 classes. The natural clients are the writers that have training
    data (105 in the file), in file order; the first ``num_clients`` are used and the
    pooled train/test arrays hold only those writers' samples (as LEAF evaluates on the
    union of the clients' test data). ``test_groups[i]`` is writer i's test data. The 79
    test-only writers are not included.

    Raises:
        DataError: the file is missing or malformed, or it has fewer writers than
            ``num_clients``.
    """
    keys = ("x_train", "y_train", "client_train", "x_test", "y_test", "client_test",
            "clients", "client_has_train")  # fmt: skip
    arrays = _read_npz("femnist", data_dir, "femnist/femnist_leaf_niid005.npz", keys)
    writers = np.flatnonzero(arrays["client_has_train"])
    if num_clients > len(writers):
        raise DataError(
            f"dataset 'femnist': num_clients={num_clients} but the file has only "
            f"{len(writers)} writers with training data"
        )
    chosen = writers[:num_clients]
    slot = np.full(
        len(arrays["clients"]), -1, dtype=np.int64
    )  # writer id -> client index
    slot[chosen] = np.arange(num_clients)

    def gather(x: np.ndarray, y: np.ndarray, owner: np.ndarray) -> tuple[Any, ...]:
        client = slot[owner.astype(np.int64)]
        rows = np.flatnonzero(client >= 0)
        rows = rows[
            np.argsort(client[rows], kind="stable")
        ]  # group by client, keep file order
        ends = np.cumsum(np.bincount(client[rows], minlength=num_clients))
        starts = np.concatenate(([0], ends[:-1]))
        groups = [
            np.arange(s, e, dtype=np.int64) for s, e in zip(starts, ends, strict=True)
        ]
        pixels = (255.0 - x[rows].astype(np.float32)) / 255.0
        return pixels[:, None], y[rows].astype(np.int64), groups

    x_tr, y_tr, g_tr = gather(
        arrays["x_train"], arrays["y_train"], arrays["client_train"]
    )
    x_te, y_te, g_te = gather(arrays["x_test"], arrays["y_test"], arrays["client_test"])
    if any(len(g) == 0 for g in g_tr):
        raise DataError(
            "dataset 'femnist': a writer marked client_has_train has no train rows"
        )
    return Dataset(
        name="femnist",
        x_train=torch.from_numpy(x_tr),
        y_train=torch.from_numpy(y_tr),
        x_test=torch.from_numpy(x_te),
        y_test=torch.from_numpy(y_te),
        num_classes=62,
        in_shape=(1, 28, 28),
        train_groups=g_tr,
        test_groups=g_te,
    )


def _load_cifar10(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """CIFAR-10 JPEG subset from ``<data_dir>/cifar10/cifar10_jpeg_subset.zip``.

    10,000 train images (the first 1,000 per class) and the full 10,000-image test set,
    re-encoded as JPEG q75 (lossy; not bit-identical to the official batches). Images
    are decoded with Pillow once and cached as uint8 in :func:`cache_dir` (keyed by the
    zip's size and mtime). Output ``[3, 32, 32]``, normalised per channel with the mean
    and std of this training subset.
    """
    path = _require_file("cifar10", data_dir, "cifar10/cifar10_jpeg_subset.zip")
    arrays = _cifar_cached(path)
    mean, std = _channel_stats(arrays["x_train"])
    x_tr = arrays["x_train"].astype(np.float32) / 255.0  # [n, 32, 32, 3]
    x_te = arrays["x_test"].astype(np.float32) / 255.0

    def prep(x: np.ndarray) -> np.ndarray:
        x -= mean
        x /= std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    return _images(
        "cifar10",
        prep(x_tr),
        arrays["y_train"].astype(np.int64),
        prep(x_te),
        arrays["y_test"].astype(np.int64),
        10,
    )


def _load_shakespeare(
    data_dir: str | None, seed: int, num_clients: int, options: dict[str, Any]
) -> Dataset:
    """LEAF-style Shakespeare, one client per (play, role): see :mod:`fedflat.data.shakespeare`.

    Read from ``<data_dir>/shakespeare_plays/*.txt``. Inputs ``[n, 80]`` float32 character
    indices, labels the next character (80 classes). The first ``num_clients`` roles of a
    fixed permutation are used; the pooled train/test arrays hold only their samples.
    ``options``: ``stride`` (window step, 1 = LEAF), ``test_fraction`` (last share of each
    role's samples held out, default 0.1).

    Raises:
        DataError: the folder is missing, or it has fewer roles than ``num_clients``.
    """
    from fedflat.data import shakespeare as shk

    allowed = {"stride", "test_fraction"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"data.shakespeare: unknown option(s) {unknown}; allowed: {sorted(allowed)}"
        )
    stride = int(options.get("stride", 1))
    test_fraction = float(options.get("test_fraction", 0.1))
    folder = _require_file("shakespeare", data_dir, "shakespeare_plays/SOURCE.md").parent
    roles = [r for r in shk.read_roles(folder) if len(shk.windows(r.codes, stride)[1]) >= 2]
    if num_clients > len(roles):
        raise DataError(
            f"dataset 'shakespeare': num_clients={num_clients} but {folder} has only "
            f"{len(roles)} roles with >= 2 samples (stride {stride})"
        )
    order = numpy_rng(SPLIT_SEED, "split", list(DATASETS).index("shakespeare")).permutation(
        len(roles)
    )
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for k in order[:num_clients]:
        x, y = shk.windows(roles[k].codes, stride)
        n_tr, _ = shk.split_sizes(len(y), test_fraction)
        xs_tr.append(x[:n_tr])
        ys_tr.append(y[:n_tr])
        xs_te.append(x[n_tr:])
        ys_te.append(y[n_tr:])

    def groups(parts: list[np.ndarray]) -> list[np.ndarray]:
        ends = np.cumsum([len(p) for p in parts])
        return [np.arange(e - len(p), e, dtype=np.int64) for p, e in zip(parts, ends, strict=True)]

    return Dataset(
        name="shakespeare",
        x_train=torch.from_numpy(np.concatenate(xs_tr).astype(np.float32)),
        y_train=torch.from_numpy(np.concatenate(ys_tr)),
        x_test=torch.from_numpy(np.concatenate(xs_te).astype(np.float32)),
        y_test=torch.from_numpy(np.concatenate(ys_te)),
        num_classes=shk.VOCAB_SIZE,
        in_shape=(shk.SEQ_LEN,),
        train_groups=groups(ys_tr),
        test_groups=groups(ys_te),
    )


Loader = Callable[[str | None, int, int, dict[str, Any]], Dataset]

DATASETS: dict[str, Loader] = {
    "synthetic": _load_synthetic,
    "digits": _load_digits,
    "femnist": _load_femnist,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "shakespeare": _load_shakespeare,
}


def load_dataset(
    name: str,
    *,
    data_dir: str | None,
    seed: int,
    num_clients: int,
    synthetic: dict[str, Any] | None = None,
    shakespeare: dict[str, Any] | None = None,
) -> Dataset:
    """Load dataset ``name``.

    Args:
        name: one of ``DATASETS``: "synthetic", "digits", "femnist", "mnist",
            "fashion_mnist", "cifar10", "shakespeare".
        data_dir: folder holding ``<name>/...`` files (see :func:`resolve_data_dir`);
            not needed for "synthetic" and "digits".
        seed: run seed; only "synthetic" draws from it (``numpy_rng(seed, "data")``).
        num_clients: number of synthetic devices, or of FEMNIST writers to keep; other
            datasets only check it is >= 1 (partitioners split them later).
        synthetic: keyword options of
            :func:`fedflat.data.synthetic.generate_synthetic` (alpha, beta, iid, ...);
            ignored by the other datasets.
        shakespeare: options of the "shakespeare" loader (stride, test_fraction).

    Returns:
        The dataset.

    Raises:
        ValueError: unknown name, ``num_clients`` < 1, unknown synthetic options.
        DataError: no data directory, a missing or unreadable file.
    """
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {sorted(DATASETS)}"
        ) from None
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    options = shakespeare if name == "shakespeare" else synthetic
    return loader(data_dir, seed, num_clients, dict(options or {}))


# ----------------------------------------------------------------------------------
# Helpers


def _require_file(name: str, data_dir: str | None, relative: str) -> Path:
    how = f"set data.data_dir in the scenario or the {DATA_ENV} environment variable"
    if not data_dir:
        raise DataError(
            f"dataset {name!r} needs the file <data_dir>/{relative}, but no data "
            f"directory is set; {how}"
        )
    path = Path(data_dir).expanduser() / relative
    if not path.is_file():
        raise DataError(
            f"dataset {name!r}: file not found: {path} ({how} to the folder that holds "
            f"{relative})"
        )
    return path


def _read_npz(
    name: str, data_dir: str | None, relative: str, keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
    path = _require_file(name, data_dir, relative)
    invalid = (f"dataset {name!r}: {path} is not a valid data file (expected a NumPy .npz "
               f"archive of the arrays {', '.join(keys)})")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError:  # neither .npz nor .npy: NumPy's only remaining format is a pickle
        raise DataError(f"{invalid}: it is not a NumPy file") from None
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{invalid}: {_why(err)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{invalid}: it holds a single array, not an archive") from None
    with loaded as f:
        missing = [k for k in keys if k not in f.files]
        if missing:
            raise DataError(f"{invalid}: it lacks the array(s) {', '.join(missing)}")
        try:
            return {k: f[k] for k in keys}
        except ValueError:  # an array of Python objects: never unpickled (unsafe)
            raise DataError(f"{invalid}: it holds Python objects, not plain arrays") from None
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            raise DataError(f"{invalid}: {_why(err)}") from None


def _why(err: BaseException) -> str:
    """What is wrong with a damaged archive, in words (zipfile's own are terse)."""
    if isinstance(err, zipfile.BadZipFile | EOFError):
        return f"the archive is damaged or truncated ({err})"
    return str(getattr(err, "strerror", None) or err)


def _to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 ``[n, H, W]`` -> float32 ``[n, 1, H, W]`` in [0, 1]."""
    out = x.astype(np.float32)
    out /= 255.0  # in place: a second float copy of MNIST's 60k images was the load's peak
    return out[:, None]


def _images(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    num_classes: int,
) -> Dataset:
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_tr, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_tr, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_te, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_te, dtype=np.int64)),
        num_classes=num_classes,
        in_shape=tuple(int(s) for s in x_tr.shape[1:]),
        train_groups=None,
        test_groups=None,
    )


def _fixed_split(
    y: np.ndarray, test_fraction: float, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified split fixed by ``SPLIT_SEED`` and the dataset name.

    Each class c contributes ``round(test_fraction·n_c)`` random samples to the test
    set. Returns sorted train and test indices.
    """
    rng = numpy_rng(SPLIT_SEED, "split", list(DATASETS).index(name))
    order = np.lexsort((rng.random(len(y)), y))  # by class, random within class
    counts = np.bincount(y)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(len(y)) - starts[y[order]]
    is_test = rank < np.round(test_fraction * counts)[y[order]]
    return np.sort(order[~is_test]), np.sort(order[is_test])


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and std of uint8 ``[..., C]`` images, scaled to [0, 1].

    Computed from a 256-bin histogram per channel: exact and much faster than a float64
    reduction over strided axes.
    """
    flat = x.reshape(-1, x.shape[-1])
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = np.empty(flat.shape[1], dtype=np.float32)
    std = np.empty(flat.shape[1], dtype=np.float32)
    for c in range(flat.shape[1]):  # one histogram per channel
        freq = np.bincount(flat[:, c], minlength=256) / len(flat)
        m = float(freq @ levels)
        mean[c] = m
        std[c] = np.sqrt(max(float(freq @ levels**2) - m * m, 0.0))
    return mean, std


def _cifar_cached(path: Path) -> dict[str, np.ndarray]:
    """Decoded uint8 arrays of the CIFAR zip, from the cache when it is current."""
    st = path.stat()
    cache = (
        cache_dir()
        / f"cifar10_jpeg_v{_CIFAR_CACHE_VERSION}_{st.st_size}_{st.st_mtime_ns}.npz"
    )
    keys = ("x_train", "y_train", "x_test", "y_test")
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                return {k: f[k] for k in keys}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a broken cache is rebuilt below
    arrays = _decode_cifar_zip(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees a half-written file.
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, cache)
    except OSError as err:
        warnings.warn(
            f"could not cache decoded CIFAR-10 at {cache}: {err}", stacklevel=3
        )
    return arrays


def _decode_cifar_zip(path: Path) -> dict[str, np.ndarray]:
    """Decode ``{train,test}/<class>/*.jpg`` entries with Pillow (sorted by name)."""
    from PIL import Image

    label_of = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".jpg"))
            for split in ("train", "test"):
                mine = [n for n in names if n.split("/")[0] == split]
                if not mine:
                    raise DataError(
                        f"dataset 'cifar10': {path} has no {split}/*.jpg entries"
                    )
                x = np.empty((len(mine), 32, 32, 3), dtype=np.uint8)
                y = np.empty(len(mine), dtype=np.int64)
                for i, entry in enumerate(mine):
                    parts = entry.split("/")
                    if len(parts) != 3 or parts[1] not in label_of:
                        raise DataError(
                            f"dataset 'cifar10': unexpected entry {entry!r} in {path}"
                        )
                    with Image.open(io.BytesIO(zf.read(entry))) as img:
                        pixels = np.asarray(img.convert("RGB"))
                    if pixels.shape != (32, 32, 3):
                        raise DataError(
                            f"dataset 'cifar10': {entry} in {path} is {pixels.shape}, "
                            "expected (32, 32, 3)"
                        )
                    x[i] = pixels
                    y[i] = label_of[parts[1]]
                out[f"x_{split}"], out[f"y_{split}"] = x, y
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"dataset 'cifar10': {path} is not a valid data file (expected a zip of "
                        f"train/<class>/*.jpg and test/<class>/*.jpg): {_why(err)}") from None
    return out
