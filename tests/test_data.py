"""Synthetic(α, β) against its definition (ALGORITHMS.md §6.5); dataset loaders."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from fedflat.data import datasets as D
from fedflat.data import generate_synthetic, load_dataset, synthetic_sizes
from fedflat.errors import DataError
from fedflat.rng import numpy_rng

DATA = os.environ.get("FEDFLAT_DATA")


def needs(relative: str):
    """Skip unless $FEDFLAT_DATA points at a folder holding ``relative``."""
    ok = bool(DATA) and Path(DATA, relative).is_file()
    return pytest.mark.skipif(
        not ok,
        reason=f"set FEDFLAT_DATA to a folder holding {relative} "
        "(e.g. /work/shared/data)",
    )


def rng(seed: int = 0) -> np.random.Generator:
    return numpy_rng(seed, "data")


def device_of_rows(groups: list[np.ndarray], n: int) -> np.ndarray:
    dev = np.full(n, -1)
    for k, g in enumerate(groups):
        dev[g] = k
    assert (dev >= 0).all()
    return dev


# ----------------------------------------------------------------------------------
# Synthetic(α, β)


def test_sizes_follow_floor_lognormal_plus_min():
    sizes = synthetic_sizes(rng(), 4000)
    assert sizes.min() >= 50
    # P(⌊L⌋ + 50 < 50 + m) = P(L < m) = Φ((ln m − 4) / 2) for integer m.
    for m in (5, 20, 55, 400, 3000):
        expected = norm.cdf((np.log(m) - 4) / 2)
        se = np.sqrt(expected * (1 - expected) / 4000)
        assert abs((sizes - 50 < m).mean() - expected) < 4 * se + 1e-3


def test_sizes_cap():
    sizes = synthetic_sizes(rng(), 1000, max_size=120)
    assert sizes.max() <= 120
    assert sizes.min() >= 50
    with pytest.raises(ValueError, match="max_size must be >= min_size=50"):
        synthetic_sizes(rng(), 3, max_size=10)


def test_feature_variance_is_j_to_the_minus_1_2():
    data = generate_synthetic(
        rng(), 50, alpha=1.0, beta=1.0, min_size=200, max_size=200
    )
    p = data.params
    x = np.concatenate([data.x_train, data.x_test]).astype(np.float64)
    dev = np.concatenate(
        [
            device_of_rows(data.train_groups, len(data.x_train)),
            device_of_rows(data.test_groups, len(data.x_test)),
        ]
    )
    resid = x - p.v[dev]
    j = np.arange(1, 61)
    ratio = resid.var(axis=0) / j**-1.2
    # 10,000 samples: relative sd of a variance estimate ~ sqrt(2/1e4) = 1.4 %.
    assert np.abs(ratio - 1).max() < 0.07
    assert np.abs(resid.mean(axis=0) / np.sqrt(j**-1.2)).max() < 0.05


def test_labels_are_argmax_of_each_device_model():
    data = generate_synthetic(rng(1), 20, alpha=0.5, beta=0.5, max_size=500)
    p = data.params
    for k in range(20):
        for x, y, g in (
            (data.x_train, data.y_train, data.train_groups[k]),
            (data.x_test, data.y_test, data.test_groups[k]),
        ):
            logits = x[g].astype(np.float64) @ p.W[k] + p.b[k]
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            softmax = exp / exp.sum(axis=1, keepdims=True)
            # float32 storage can flip a near-tie; allow a tiny fraction.
            assert (softmax.argmax(axis=1) == y[g]).mean() > 0.995


def test_zero_alpha_beta_priors_are_zero_mean_unit_noise():
    data = generate_synthetic(rng(2), 40, alpha=0.0, beta=0.0, max_size=100)
    p = data.params
    assert np.all(p.u == 0)
    assert np.all(p.B == 0)
    # W_k, b_k ~ N(0, 1) and v_k ~ N(0, 1) entrywise: 40*600 weights, 40*60 means.
    assert abs(p.W.mean()) < 0.03
    assert abs(p.W.var() - 1) < 0.04
    assert abs(p.v.mean()) < 0.1
    assert abs(p.v.var() - 1) < 0.1


@pytest.mark.parametrize(
    ("scale", "expected_sd"), [("std", 0.5), ("variance", np.sqrt(0.5))]
)
def test_prior_scale_convention(scale, expected_sd):
    data = generate_synthetic(
        rng(3),
        4000,
        alpha=0.5,
        beta=0.5,
        prior_scale=scale,
        num_features=2,
        num_classes=2,
        min_size=10,
        max_size=10,
    )
    # sd of a sample sd from 4000 normals ~ sd / sqrt(8000) ~ 0.008.
    assert abs(data.params.u.std() - expected_sd) < 0.03
    assert abs(data.params.B.std() - expected_sd) < 0.03


def test_iid_variant_shares_one_model_and_zero_means():
    data = generate_synthetic(rng(4), 10, iid=True, max_size=300)
    p = data.params
    assert np.all(p.W[0] == p.W)
    assert np.all(p.b == p.b[0])
    assert np.all(p.v == 0)
    assert np.all(p.u == 0)
    x = np.concatenate([data.x_train, data.x_test]).astype(np.float64)
    assert np.abs(x.mean(axis=0) / np.sqrt(np.arange(1, 61) ** -1.2)).max() < 0.2


def test_per_device_90_10_split():
    data = generate_synthetic(rng(5), 30, alpha=1.0, beta=1.0, max_size=2000)
    sizes = data.params.sizes
    n_train = np.array([len(g) for g in data.train_groups])
    n_test = np.array([len(g) for g in data.test_groups])
    assert np.array_equal(n_train + n_test, sizes)
    assert np.array_equal(n_train, (9 * sizes) // 10)  # int(0.9 n) of the released code
    assert data.x_train.dtype == np.float32
    assert data.y_train.dtype == np.int64
    assert len(data.x_train) == n_train.sum()
    assert len(data.x_test) == n_test.sum()


@pytest.mark.timeout(60)
def test_synthetic_generates_1000_devices():
    # No timed assert (shared machine): the timeout only catches a generator gone quadratic.
    data = generate_synthetic(rng(6), 1000, alpha=1.0, beta=1.0, max_size=1000)
    assert len(data.train_groups) == 1000


def test_load_synthetic_dataset_deterministic():
    kw = {"data_dir": None, "num_clients": 30, "synthetic": {"alpha": 1.0, "beta": 1.0}}
    a = load_dataset("synthetic", seed=7, **kw)
    b = load_dataset("synthetic", seed=7, **kw)
    c = load_dataset("synthetic", seed=8, **kw)
    assert a.in_shape == (60,)
    assert a.num_classes == 10
    assert len(a.train_groups) == 30
    assert len(a.test_groups) == 30
    assert a.x_train.dtype == torch.float32
    assert a.y_train.dtype == torch.int64
    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape != c.x_train.shape or not torch.equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match="unknown option"):
        load_dataset(
            "synthetic", seed=0, data_dir=None, num_clients=3, synthetic={"gamma": 1}
        )


def test_synthetic_rejects_bad_options():
    with pytest.raises(ValueError, match="prior_scale"):
        generate_synthetic(rng(), 3, prior_scale="var")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        generate_synthetic(rng(), 3, alpha=-1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        generate_synthetic(rng(), 3, test_fraction=1.0)


# ----------------------------------------------------------------------------------
# Loaders without files, errors


def test_digits_fixed_stratified_split():
    a = load_dataset("digits", data_dir=None, seed=0, num_clients=1)
    b = load_dataset("digits", data_dir=None, seed=99, num_clients=1)
    assert a.in_shape == (1, 8, 8)
    assert len(a.x_train) + len(a.x_test) == 1797  # sklearn's digits
    assert abs(len(a.x_test) / 1797 - 0.2) < 0.01
    assert float(a.x_train.min()) == 0.0
    assert float(a.x_train.max()) == 1.0
    assert torch.equal(a.y_test, b.y_test)  # fixed split, independent of the run seed
    tr = np.bincount(a.y_train.numpy(), minlength=10)
    te = np.bincount(a.y_test.numpy(), minlength=10)
    assert np.abs(te / (tr + te) - 0.2).max() < 0.01


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "femnist", "cifar10"])
def test_missing_data_dir_or_file_raises_data_error(name, tmp_path):
    with pytest.raises(DataError, match=r"data\.data_dir") as err:
        load_dataset(name, data_dir=None, seed=0, num_clients=1)
    assert "FEDFLAT_DATA" in str(err.value)
    assert name in str(err.value)
    with pytest.raises(DataError, match="file not found") as err:
        load_dataset(name, data_dir=str(tmp_path), seed=0, num_clients=1)
    assert str(tmp_path / name) in str(err.value)


def test_synthetic_options_are_ignored_by_other_datasets():
    ds = load_dataset(
        "digits",
        data_dir=None,
        seed=0,
        num_clients=1,
        synthetic={"alpha": 1.0, "beta": 1.0},
    )
    assert ds.name == "digits"


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", data_dir=None, seed=0, num_clients=1)


def test_corrupt_npz_raises_data_error(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "mnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is not a valid data file") as info:
        load_dataset("mnist", data_dir=str(tmp_path), seed=0, num_clients=1)
    assert "pickle" not in str(info.value)  # never suggest loading it unsafely


# ----------------------------------------------------------------------------------
# CIFAR-10 decoding and cache, on a small fabricated zip


def make_fake_cifar_zip(
    path: Path,
) -> dict[str, list[tuple[int, tuple[int, int, int]]]]:
    from PIL import Image

    path.parent.mkdir(parents=True)
    colours = {"airplane": (200, 30, 30), "truck": (20, 180, 60), "cat": (40, 40, 220)}
    made: dict[str, list[tuple[int, tuple[int, int, int]]]] = {"train": [], "test": []}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for split, count in (("train", 3), ("test", 2)):
            for cls, rgb in colours.items():
                for i in range(count):
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), rgb).save(buf, format="JPEG", quality=75)
                    zf.writestr(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())
                    made[split].append((D.CIFAR10_CLASSES.index(cls), rgb))
    return made


def test_cifar10_decodes_normalises_and_caches(tmp_path, monkeypatch):
    made = make_fake_cifar_zip(
        tmp_path / "data" / "cifar10" / "cifar10_jpeg_subset.zip"
    )
    monkeypatch.setenv("FEDFLAT_CACHE_DIR", str(tmp_path / "cache"))
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "data"), seed=0, num_clients=1)
    assert ds.in_shape == (3, 32, 32)
    assert ds.num_classes == 10
    assert sorted(ds.y_train.tolist()) == sorted(c for c, _ in made["train"])
    assert sorted(ds.y_test.tolist()) == sorted(c for c, _ in made["test"])
    # Per-channel normalisation over the training set.
    x = ds.x_train.double()
    assert torch.allclose(
        x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=x.dtype), atol=1e-5
    )
    assert torch.allclose(
        x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=x.dtype), atol=1e-4
    )
    # Solid colours survive JPEG within a few levels: same class -> same colour as made.
    raw = np.load(next((tmp_path / "cache").glob("cifar10_*.npz")))
    colour_of = dict(made["train"])
    for img, label in zip(raw["x_train"], raw["y_train"], strict=True):
        assert np.abs(img.reshape(-1, 3).mean(0) - colour_of[int(label)]).max() < 4

    # Second load must come from the cache.
    def boom(path):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(D, "_decode_cifar_zip", boom)
    again = load_dataset(
        "cifar10", data_dir=str(tmp_path / "data"), seed=0, num_clients=1
    )
    assert torch.equal(again.x_test, ds.x_test)


# ----------------------------------------------------------------------------------
# Real files (FEDFLAT_DATA)


@needs("femnist/femnist_leaf_niid005.npz")
def test_femnist_counts_and_writer_groups():
    ds = load_dataset("femnist", data_dir=DATA, seed=0, num_clients=105)
    # SOURCE.md: 105 writers with train data, 14,708 train samples, 4,088 test samples
    # of which 2,403 belong to the 79 test-only writers (left out here).
    assert len(ds.x_train) == 14708
    assert len(ds.x_test) == 4088 - 2403
    assert len(ds.train_groups) == 105
    assert len(ds.test_groups) == 105
    assert ds.in_shape == (1, 28, 28)
    assert ds.num_classes == 62
    y = ds.y_train.numpy()
    # SOURCE.md: 10,596 digits, 2,047 uppercase, 2,065 lowercase letters.
    assert [(y < 10).sum(), ((y >= 10) & (y < 36)).sum(), (y >= 36).sum()] == [
        10596,
        2047,
        2065,
    ]
    sizes = [len(g) for g in ds.train_groups]
    assert min(sizes) == 4
    assert max(sizes) == 165
    assert np.median(sizes) == 152
    # Inverted polarity: background (most pixels) is near 0, ink near 1.
    assert float(ds.x_train.median()) < 0.05
    assert float(ds.x_train.max()) > 0.95
    with pytest.raises(DataError, match="only 105 writers"):
        load_dataset("femnist", data_dir=DATA, seed=0, num_clients=106)


@needs("femnist/femnist_leaf_niid005.npz")
def test_femnist_groups_align_with_file_writers():
    ds = load_dataset("femnist", data_dir=DATA, seed=0, num_clients=5)
    with np.load(Path(DATA, "femnist/femnist_leaf_niid005.npz")) as f:
        writers = np.flatnonzero(f["client_has_train"])[:5]
        for i, w in enumerate(writers):
            tr = f["client_train"] == w
            te = f["client_test"] == w
            assert np.array_equal(
                ds.y_train.numpy()[ds.train_groups[i]], f["y_train"][tr]
            )
            assert np.array_equal(ds.y_test.numpy()[ds.test_groups[i]], f["y_test"][te])
            pix = (255 - f["x_train"][tr].astype(np.float32)) / 255
            assert np.allclose(ds.x_train.numpy()[ds.train_groups[i], 0], pix)


@needs("mnist/mnist.npz")
def test_mnist_class_counts():
    ds = load_dataset("mnist", data_dir=DATA, seed=0, num_clients=1)
    assert np.bincount(ds.y_train.numpy()).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(ds.y_test.numpy()).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert ds.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert ds.x_train.shape == (60000, 1, 28, 28)
    assert float(ds.x_train.min()) == 0.0
    assert float(ds.x_train.max()) == 1.0


@needs("fashion_mnist/fashion_mnist_test.npz")
def test_fashion_mnist_split_of_the_test_set():
    ds = load_dataset("fashion_mnist", data_dir=DATA, seed=0, num_clients=1)
    assert np.bincount(ds.y_train.numpy()).tolist() == [800] * 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [200] * 10
    assert ds.in_shape == (1, 28, 28)


@pytest.mark.slow
@needs("cifar10/cifar10_jpeg_subset.zip")
def test_cifar10_real_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDFLAT_CACHE_DIR", str(tmp_path))
    ds = load_dataset("cifar10", data_dir=DATA, seed=0, num_clients=1)
    # SOURCE.md: 1,000 train images per class and the full 10,000-image test set.
    assert np.bincount(ds.y_train.numpy()).tolist() == [1000] * 10
    assert np.bincount(ds.y_test.numpy()).tolist() == [1000] * 10
    assert ds.x_train.shape == (10000, 3, 32, 32)
