"""Synthetic(α, β) federated classification data of the FedProx paper.

The generator follows the released FedProx scripts (ALGORITHMS.md §6.5): every device k
has its own softmax-regression model ``(W_k, b_k)`` and its own feature mean ``v_k``; α
controls how much the models differ across devices and β how much the inputs differ.

References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in
    Heterogeneous Networks" (FedProx), MLSys 2020. https://arxiv.org/abs/1812.06127 ;
    code:
    litian96/FedProx ``data/synthetic_*/generate_synthetic.py``, ``data/synthetic_iid``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

PriorScale = Literal["std", "variance"]


@dataclass(frozen=True, eq=False)
class SyntheticParams:
    """The generating model, returned so that callers (and tests) can check the data.

    Attributes:
        u: ``[K]`` device model-prior means (``W_k, b_k ~ N(u_k, 1)``); zeros when iid.
        B: ``[K]`` device input-prior means (``v_k ~ N(B_k, 1)``); zeros when iid.
        v: ``[K, d]`` device input means; zeros when iid.
        W: ``[K, d, C]`` device weights (all equal when iid).
        b: ``[K, C]`` device biases (all equal when iid).
        feature_var: ``[d]`` the input covariance diagonal ``j^-1.2``, j = 1..d.
        sizes: ``[K]`` samples per device (train + test).
    """

    u: np.ndarray
    B: np.ndarray
    v: np.ndarray
    W: np.ndarray
    b: np.ndarray
    feature_var: np.ndarray
    sizes: np.ndarray


@dataclass(frozen=True, eq=False)
class SyntheticData:
    """Pooled arrays of all devices plus the per-device index groups.

    Attributes:
        x_train: ``[n_train, d]`` float32, devices stored one after another.
        y_train: ``[n_train]`` int64.
        x_test: ``[n_test, d]`` float32.
        y_test: ``[n_test]`` int64.
        train_groups: device k's rows of ``x_train`` (contiguous, in device order).
        test_groups: device k's rows of ``x_test``.
        params: the generating model.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_groups: list[np.ndarray]
    test_groups: list[np.ndarray]
    params: SyntheticParams


def synthetic_sizes(
    rng: np.random.Generator,
    num_devices: int,
    *,
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_size: int = 50,
    max_size: int | None = None,
) -> np.ndarray:
    """Per-device sample counts ``⌊LogNormal(size_mean, size_sigma)⌋ + min_size``.

    The released code draws ``np.random.lognormal(4, 2).astype(int) + 50``: a heavy tail
    (mean e^6 ≈ 403, but single devices of 10^4-10^5 samples occur). ``max_size`` caps
    the total per device to keep such a device from dominating memory and time.

    Args:
        rng: source of randomness.
        num_devices: number of devices K (>= 1).
        size_mean: μ of the log-normal (of the underlying normal).
        size_sigma: σ of the log-normal (>= 0).
        min_size: constant added to every device (>= 1).
        max_size: optional cap on a device's total size (>= min_size); None = no cap.

    Returns:
        int64 array ``[K]``.

    Raises:
        ValueError: a parameter out of range.
    """
    _check_int("num_devices", num_devices, 1)
    _check_int("min_size", min_size, 1)
    if not size_sigma >= 0:
        raise ValueError(f"size_sigma must be >= 0, got {size_sigma}")
    if not math.isfinite(size_mean):
        raise ValueError(f"size_mean must be finite, got {size_mean}")
    if max_size is not None and max_size < min_size:
        raise ValueError(f"max_size must be >= min_size={min_size}, got {max_size}")
    draws = rng.lognormal(size_mean, size_sigma, num_devices)
    # Cap in float first: a 1e30 draw would overflow the integer cast.
    if max_size is not None:
        draws = np.minimum(draws, max_size - min_size)
    sizes = np.floor(draws).astype(np.int64) + min_size
    return sizes


def generate_synthetic(
    rng: np.random.Generator,
    num_devices: int,
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    iid: bool = False,
    num_features: int = 60,
    num_classes: int = 10,
    prior_scale: PriorScale = "std",
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_size: int = 50,
    test_fraction: float = 0.1,
    max_size: int | None = None,
) -> SyntheticData:
    """Generate Synthetic(α, β) (or Synthetic-IID) for ``num_devices`` devices.

    Per device k (ALGORITHMS.md §6.5):
    ``n_k = ⌊LogNormal(size_mean, size_sigma)⌋ + min_size``; ``u_k ~ N(0, α)``,
    ``B_k ~ N(0, β)``; ``W_k`` ``[d, C]`` and ``b_k`` ``[C]`` entries ``~ N(u_k, 1)``;
    ``v_k`` ``[d]`` entries ``~ N(B_k, 1)``; ``x ~ N(v_k, diag(j^-1.2))``;
    ``y = argmax(x W_k + b_k)`` (argmax of the softmax is the argmax of the logits).
    IID variant: one global ``W, b ~ N(0, 1)`` and ``x ~ N(0, diag(j^-1.2))``
    everywhere. Each device's samples are shuffled and its first
    ``⌊(1 - test_fraction)·n_k⌋`` go to train, the rest to test (the released code uses
    ``int(0.9 * n)``).

    Args:
        rng: source of all randomness (derive it with
            ``fedflat.rng.numpy_rng(seed, "data")``).
        num_devices: number of devices K (>= 1); the FedProx paper uses 30.
        alpha: model heterogeneity α (>= 0); ignored when ``iid``.
        beta: input heterogeneity β (>= 0); ignored when ``iid``.
        iid: generate Synthetic-IID instead.
        num_features: input dimension d (60 in the paper).
        num_classes: number of classes C (10 in the paper).
        prior_scale: how α and β are read. ``"std"`` (default): as the standard
            deviation of ``u_k``/``B_k``, which is what the released code does
            (``np.random.normal`` scale). ``"variance"``: as the variance, as the paper
            writes ``N(0, α)``, i.e. std = sqrt(α). The two agree for α, β in {0, 1} and
            differ for 0.5.
        size_mean: μ of the log-normal device sizes.
        size_sigma: σ of the log-normal device sizes.
        min_size: constant added to every device size.
        test_fraction: fraction of each device's samples held out, in [0, 1).
        max_size: optional cap on a device's total size; None = no cap (as released).

    Returns:
        The pooled arrays, per-device groups and the generating parameters.

    Raises:
        ValueError: a parameter out of range.
    """
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    _check_int("num_features", num_features, 1)
    _check_int("num_classes", num_classes, 2)
    if prior_scale not in ("std", "variance"):
        raise ValueError(
            f"prior_scale must be 'std' or 'variance', got {prior_scale!r}"
        )
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    sizes = synthetic_sizes(
        rng,
        num_devices,
        size_mean=size_mean,
        size_sigma=size_sigma,
        min_size=min_size,
        max_size=max_size,
    )
    k, d, c = num_devices, num_features, num_classes
    feature_var = np.arange(1, d + 1, dtype=np.float64) ** -1.2
    if iid:
        u = np.zeros(k)
        prior_b = np.zeros(k)
        v = np.zeros((k, d))
        w_global = rng.normal(0.0, 1.0, (d, c))
        b_global = rng.normal(0.0, 1.0, c)
        weights = np.broadcast_to(w_global, (k, d, c)).copy()
        biases = np.broadcast_to(b_global, (k, c)).copy()
    else:
        to_std = math.sqrt if prior_scale == "variance" else float
        u = rng.normal(0.0, to_std(alpha), k)
        prior_b = rng.normal(0.0, to_std(beta), k)
        v = prior_b[:, None] + rng.standard_normal((k, d))
        # W_k and b_k share the prior mean u_k as in the released code (mean_b = mean_W)
        weights = u[:, None, None] + rng.standard_normal((k, d, c))
        biases = u[:, None] + rng.standard_normal((k, c))

    n = int(sizes.sum())
    device = np.repeat(np.arange(k), sizes)  # [n] device of each row
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    x = v[device] + rng.standard_normal((n, d)) * np.sqrt(feature_var)
    y = np.empty(n, dtype=np.int64)
    for dev in range(k):  # one matmul per device; a gathered [n, d, C] W would not fit
        rows = slice(starts[dev], starts[dev] + sizes[dev])
        y[rows] = np.argmax(x[rows] @ weights[dev] + biases[dev], axis=1)

    # Shuffle within each device: sort by (device, random key).
    order = np.lexsort((rng.random(n), device))
    rank = np.arange(n) - starts[device]  # position inside the shuffled device block
    n_train = np.floor((1.0 - test_fraction) * sizes).astype(np.int64)
    is_train = rank < n_train[device]
    train_rows, test_rows = order[is_train], order[~is_train]
    train_ends = np.cumsum(n_train)
    test_ends = np.cumsum(sizes - n_train)
    return SyntheticData(
        x_train=x[train_rows].astype(np.float32),
        y_train=y[train_rows],
        x_test=x[test_rows].astype(np.float32),
        y_test=y[test_rows],
        train_groups=_ranges(train_ends),
        test_groups=_ranges(test_ends),
        params=SyntheticParams(
            u=u,
            B=prior_b,
            v=v,
            W=weights,
            b=biases,
            feature_var=feature_var,
            sizes=sizes,
        ),
    )


def _ranges(ends: np.ndarray) -> list[np.ndarray]:
    starts = np.concatenate(([0], ends[:-1]))
    return [np.arange(s, e, dtype=np.int64) for s, e in zip(starts, ends, strict=True)]


def _check_int(name: str, value: int, low: int) -> None:
    if (
        not isinstance(value, (int, np.integer))
        or isinstance(value, bool)
        or value < low
    ):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# ----------------------------------------------------------------------------------
# Devices on demand (data.synthetic.on_demand): the data set is a function of (seed, k)


@dataclass(frozen=True, eq=False)
class SyntheticDevices:
    """Synthetic(α, β) devices generated one at a time from ``(seed, device id)``.

    Only the per-device sizes are held (16 bytes a device), so a population of 10⁶ costs
    16 MB wherever it is shipped; :meth:`device` draws device k's model, inputs, labels
    and train/test split from its own stream ``numpy_rng(seed, "data", 1, k)``. The sizes
    are the pooled generator's (the same first draw of ``numpy_rng(seed, "data")``), but
    the examples differ from :func:`generate_synthetic`'s, which draws all devices from
    one stream; the distribution is the same (ALGORITHMS.md §6.5).

    Attributes:
        seed: run seed.
        sizes: ``[K]`` samples per device (train + test).
        train_sizes: ``[K]`` training samples per device, ``⌊(1 - test_fraction)·n_k⌋``.
        options: the generator's keyword options (alpha, beta, iid, ...).
    """

    seed: int
    sizes: np.ndarray
    train_sizes: np.ndarray
    options: dict[str, Any]

    @property
    def num_devices(self) -> int:
        return len(self.sizes)

    def device(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Device k's ``(x_train, y_train, x_test, y_test)`` (float32 inputs, int64 labels)."""
        from fedflat.rng import numpy_rng  # data -> rng only; kept local to the on-demand path

        if not 0 <= k < self.num_devices:
            raise IndexError(f"device {k} out of range 0..{self.num_devices - 1}")
        o = self.options
        d, c = o["num_features"], o["num_classes"]
        n = int(self.sizes[k])
        rng = numpy_rng(self.seed, "data", 1, int(k))
        feature_sd = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
        if o["iid"]:
            glob = numpy_rng(self.seed, "data", 0)
            weights, bias = glob.normal(0.0, 1.0, (d, c)), glob.normal(0.0, 1.0, c)
            x = rng.standard_normal((n, d)) * feature_sd
        else:
            to_std = math.sqrt if o["prior_scale"] == "variance" else float
            u = rng.normal(0.0, to_std(o["alpha"]))
            prior_b = rng.normal(0.0, to_std(o["beta"]))
            v = prior_b + rng.standard_normal(d)
            weights = u + rng.standard_normal((d, c))
            bias = u + rng.standard_normal(c)
            x = v + rng.standard_normal((n, d)) * feature_sd
        y = np.argmax(x @ weights + bias, axis=1).astype(np.int64)
        order = rng.permutation(n)
        x, y = x[order].astype(np.float32), y[order]
        t = int(self.train_sizes[k])
        return x[:t], y[:t], x[t:], y[t:]


def synthetic_devices(
    seed: int,
    num_devices: int,
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    iid: bool = False,
    num_features: int = 60,
    num_classes: int = 10,
    prior_scale: PriorScale = "std",
    size_mean: float = 4.0,
    size_sigma: float = 2.0,
    min_size: int = 50,
    test_fraction: float = 0.1,
    max_size: int | None = None,
) -> SyntheticDevices:
    """The on-demand form of :func:`generate_synthetic` (same options, same sizes).

    Raises:
        ValueError: a parameter out of range.
    """
    from fedflat.rng import numpy_rng

    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    _check_int("num_features", num_features, 1)
    _check_int("num_classes", num_classes, 2)
    if prior_scale not in ("std", "variance"):
        raise ValueError(f"prior_scale must be 'std' or 'variance', got {prior_scale!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    sizes = synthetic_sizes(numpy_rng(seed, "data"), num_devices, size_mean=size_mean,
                            size_sigma=size_sigma, min_size=min_size, max_size=max_size)
    train = np.floor((1.0 - test_fraction) * sizes).astype(np.int64)
    options = {"alpha": alpha, "beta": beta, "iid": iid, "num_features": num_features,
               "num_classes": num_classes, "prior_scale": prior_scale}
    return SyntheticDevices(seed=int(seed), sizes=sizes, train_sizes=train, options=options)
