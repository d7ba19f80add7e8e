"""Every registered data set loader: shapes, label ranges, split sizes, determinism, clear errors."""
from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import curvlab
from curvlab.data import DatasetError, Split, load_mnist
from curvlab.experiments.idx import MNIST_FILES, read_idx, read_mnist_dir

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(
    not MNIST_DIR.is_dir(), reason=f"real MNIST not found at {MNIST_DIR} (../shared/data/mnist from the repo root)")


def _check_split(s: Split, n_train: int, n_test: int, features: int, classes: int) -> None:
    assert (s.num_train, s.num_test, s.num_features, s.num_classes) == (n_train, n_test, features, classes)
    assert s.x_train.shape == (n_train, features) and s.x_test.shape == (n_test, features)
    assert torch.isfinite(s.x_train).all() and torch.isfinite(s.x_test).all()
    if s.task == "classification":
        assert s.y_train.dtype == torch.int64 and s.y_train.shape == (n_train,)
        assert int(s.y_train.min()) >= 0 and int(s.y_train.max()) < classes
        assert int(s.y_test.min()) >= 0 and int(s.y_test.max()) < classes
        assert s.num_outputs == classes


def test_every_builtin_dataset_is_registered() -> None:
    assert {"digits", "mnist", "mnist1d", "regression", "teacher_student"} <= set(curvlab.DATASETS.names())
    with pytest.raises(ValueError, match="Did you mean 'mnist'"):
        curvlab.DATASETS.get("mnsit")


@pytest.mark.parametrize("normalize", ["standardize", "global", "none"])
def test_digits(normalize: str) -> None:
    s = curvlab.DATASETS.get("digits")(normalize=normalize)
    _check_split(s, 1347, 450, 64, 10)
    assert s.input_shape == (1, 8, 8) and s.example_shape == (1, 8, 8)
    if normalize == "global":
        assert abs(float(s.x_train.mean())) < 1e-5 and abs(float(s.x_train.std()) - 1) < 1e-3
    if normalize == "none":
        assert float(s.x_train.max()) == 16.0  # raw 0..16 pixel counts


def test_bad_normalize_is_named() -> None:
    with pytest.raises(DatasetError, match="normalize must be one of"):
        curvlab.DATASETS.get("digits")(normalize="minmax")


# ----------------------------------------------------------------------------------------- MNIST (real files)


@needs_mnist
def test_real_mnist_shapes_counts_and_pixel_mean() -> None:
    s = load_mnist(str(MNIST_DIR), normalize="none")
    _check_split(s, 60000, 10000, 784, 10)
    assert s.input_shape == (1, 28, 28)
    counts = torch.bincount(s.y_train, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # data/README.md
    assert abs(float(s.x_train.mean(dtype=torch.float64)) - 0.1307) < 1e-4
    assert float(s.x_train.min()) == 0.0 and float(s.x_train.max()) == 1.0


@needs_mnist
def test_real_mnist_global_normalization_and_subsets() -> None:
    s = load_mnist(str(MNIST_DIR), num_train=1000, num_test=200)
    _check_split(s, 1000, 200, 784, 10)
    assert abs(float(s.x_train.double().mean())) < 1e-4 and abs(float(s.x_train.double().std()) - 1) < 1e-3
    full = load_mnist(str(MNIST_DIR), normalize="none", num_train=1000, num_test=200)
    assert torch.equal(full.y_train, s.y_train)  # first examples, deterministic
    with pytest.raises(DatasetError, match="num_train"):
        load_mnist(str(MNIST_DIR), num_train=0)


# ------------------------------------------------------------------------------------- MNIST (synthetic IDX)


def _idx_bytes(array: np.ndarray) -> bytes:
    code = {1: 0x01, 3: 0x03}[array.ndim]
    return struct.pack(">BBBB", 0, 0, 0x08, code) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, side: int = 28) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    parts = {"train": n_train, "test": n_test}
    for key, stem in MNIST_FILES.items():
        part, kind = key.split("_")
        n = parts[part]
        arr = rng.integers(0, 256, (n, side, side), dtype=np.uint8) if kind == "images" else \
            (np.arange(n) % 10).astype(np.uint8)
        data = _idx_bytes(arr)
        if gz:
            (root / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (root / stem).write_bytes(data)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_on_synthetic_idx_files(tmp_path: Path, gz: bool) -> None:
    root = _write_mnist(tmp_path / "m", gz=gz)
    s = load_mnist(str(root), normalize="none")
    _check_split(s, 12, 5, 784, 10)
    assert s.y_train.tolist() == [i % 10 for i in range(12)]
    raw = read_mnist_dir(root)["train_images"]
    assert torch.equal(s.x_train, torch.from_numpy(raw.reshape(12, -1).astype(np.float32)) / 255.0)


def test_mnist_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*train-images-idx3-ubyte"):
        load_mnist(str(tmp_path / "nowhere"))


def test_mnist_missing_files_are_all_named(tmp_path: Path) -> None:
    root = _write_mnist(tmp_path / "m")
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    (root / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="lacks train-labels-idx1-ubyte.*t10k-images-idx3-ubyte"):
        load_mnist(str(root))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-7], "truncated"),
    (lambda b: b + b"\0", "holds"),
    (lambda b: b"\x00\x00\x0d\x03" + b[4:], "not an IDX file"),
    (lambda b: b"PK\x03\x04" + b[4:], "not an IDX file"),
])
def test_mnist_malformed_file_is_named(tmp_path: Path, damage, message: str) -> None:
    root = _write_mnist(tmp_path / "m", gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DatasetError, match=message) as info:
        load_mnist(str(root))
    assert "train-images-idx3-ubyte" in str(info.value)


def test_mnist_corrupt_gzip_and_inconsistent_parts(tmp_path: Path) -> None:
    root = _write_mnist(tmp_path / "a")
    gz = root / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DatasetError, match="t10k-labels.*corrupt gzip"):
        load_mnist(str(root))
    root = _write_mnist(tmp_path / "b", gz=False)
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="12 images but 11 labels"):
        load_mnist(str(root))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(12, 10, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="labels must lie in 0..9"):
        load_mnist(str(root))
    (root / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros((12, 2, 2), dtype=np.uint8)))
    with pytest.raises(DatasetError, match="expected labels with 1 dimension"):
        load_mnist(str(root))


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(gzip.compress(_idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "x"), arr)


# ----------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_generated_offline_and_restores_global_rngs(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d", reason="the mnist1d package generates MNIST-1D (pip install mnist1d requests)")
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load = curvlab.DATASETS.get("mnist1d")
    a = load(num_samples=200)
    assert (np.random.rand(), random.random()) == (expect_np, expect_py)  # global generators untouched
    _check_split(a, 160, 40, 40, 10)
    assert a.input_shape == (1, 40)
    b = load(num_samples=200, cache_dir=str(tmp_path))
    c = load(num_samples=200, cache_dir=str(tmp_path))  # read back from the cache
    assert len(list(tmp_path.iterdir())) == 1
    assert torch.equal(a.x_train, b.x_train) and torch.equal(b.x_train, c.x_train)
    assert torch.equal(a.y_test, c.y_test)
    assert not torch.equal(load(num_samples=200, generation_seed=0).x_train, a.x_train)
    with pytest.raises(DatasetError, match="train_split"):
        load(train_split=1.0)


# ------------------------------------------------------------------------------------------------ synthetic


def test_regression_is_seeded_and_linear() -> None:
    load = curvlab.DATASETS.get("regression")
    s = load(num_train=200, num_test=50, num_features=5, num_outputs=3, noise=0.0, seed=1)
    assert s.task == "regression" and s.num_classes == 0 and s.num_outputs == 3
    assert s.y_train.shape == (200, 3) and s.y_train.dtype == torch.float32 and s.x_test.shape == (50, 5)
    assert torch.equal(s.x_train, load(num_train=200, num_test=50, num_features=5, num_outputs=3, noise=0.0,
                                       seed=1).x_train)
    assert not torch.equal(s.x_train, load(num_train=200, num_test=50, num_features=5, num_outputs=3,
                                           seed=2).x_train)
    design = torch.cat([s.x_train, torch.ones(200, 1)], 1).double()
    fit = torch.linalg.lstsq(design, s.y_train.double()).solution
    assert (design @ fit - s.y_train.double()).abs().max() < 1e-5  # noise=0: exactly linear
    with pytest.raises(DatasetError, match="num_outputs"):
        load(num_outputs=0)
    with pytest.raises(DatasetError, match="noise"):
        load(noise=-1.0)


def test_teacher_student_classification_and_regression() -> None:
    load = curvlab.DATASETS.get("teacher_student")
    s = load(num_train=500, num_test=100, num_features=8, num_classes=4)
    _check_split(s, 500, 100, 8, 4)
    assert torch.bincount(s.y_train, minlength=4).min() > 0  # centred teacher: every class occurs
    r = load(num_train=50, num_test=10, num_classes=3, task="regression", noise=0.1)
    assert r.task == "regression" and r.y_train.shape == (50, 3) and r.y_train.dtype == torch.float32
    assert torch.equal(s.y_train, load(num_train=500, num_test=100, num_features=8, num_classes=4).y_train)
    with pytest.raises(DatasetError, match="task"):
        load(task="ranking")
    with pytest.raises(DatasetError, match="teacher_depth"):
        load(teacher_depth=-1)


def test_split_to_keeps_label_dtype() -> None:
    s = curvlab.DATASETS.get("digits")().to(torch.float64)
    assert s.x_train.dtype == torch.float64 and s.y_train.dtype == torch.int64
    r = curvlab.DATASETS.get("regression")(num_train=4, num_test=2).to(torch.float64)
    assert r.y_train.dtype == torch.float64
    with pytest.raises(DatasetError, match="task"):
        Split(s.x_train, s.y_train, s.x_test, s.y_test, 64, 10, "x", task="ranking")
