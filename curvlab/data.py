"""Offline data sets for experiments, demos and tests, each registered by name (``curvlab.DATASETS``).

Every loader returns a :class:`Split` (flattened features, a deterministic train/test split, normalized
with TRAIN statistics only) and is registered with :func:`curvlab.register_dataset`, so a config names it
(``[data] name = "mnist"``) and users add their own loader the same way::

    @curvlab.register_dataset("my_data")
    def load_my_data(seed: int = 0, ...) -> curvlab.data.Split: ...

=================== ==================================================================================
``digits``          scikit-learn's bundled 8x8 digits (1797 images; the embedded default)
``mnist1d``         MNIST-1D (Greydanus 2020), generated procedurally by the ``mnist1d`` package
``mnist``           MNIST from any directory holding the four standard IDX files (gzipped or not)
``regression``      synthetic linear-teacher regression ``y = x W + noise``
``teacher_student`` a random tanh-MLP teacher labels Gaussian inputs (classification or regression)
``modular``         modular arithmetic ``(a op b) mod p`` as token sequences (Power et al. 2022, grokking)
``chars``           character-level language modelling on a bundled English text (next character at
                    every position)
=================== ==================================================================================

Classification targets are int64 class indices, ``(N,)`` or one per position ``(N, T)`` (language
modelling); regression targets are float ``(N, D)``. Token data sets (``vocab_size`` set) have int64
inputs: token ids, never normalized or cast to the model dtype. MNIST parsing lives in
:mod:`curvlab.experiments.idx`, the synthetic generators in :mod:`curvlab.experiments.synthetic`, the
token data sets in :mod:`curvlab.experiments.sequences`. Every data set also takes the ``[data]`` keys
``val_fraction``, ``val_seed`` and ``evaluate_on`` (a validation part carved from the training data, see
:mod:`curvlab.validation`). :func:`batches` turns tensors into minibatches (any batch size up
to the full data set).
"""
from __future__ import annotations

import operator
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .registry import register_dataset

__all__ = ["Split", "DatasetError", "NORMALIZATIONS", "load_digits", "load_mnist1d", "load_mnist",
           "standardize", "normalize_features", "batches"]

#: ``normalize`` values every loader accepts (statistics from the TRAIN part only).
NORMALIZATIONS = ("standardize", "global", "none")


class DatasetError(ValueError):
    """A data set cannot be loaded: missing or malformed files, bad options (the message says which)."""


@dataclass(frozen=True)
class Split:
    """A train/test split.

    Attributes:
        x_train: ``(N_train, num_features)`` float features (flattened; see ``input_shape``), or int64
            token ids ``(N_train, T)`` when ``vocab_size`` is set.
        y_train: ``(N_train,)`` int64 class labels, ``(N_train, T)`` int64 labels per position (language
            modelling: cross-entropy and accuracy are averaged over all ``N * T`` positions), or
            ``(N_train, D)`` float targets for regression.
        x_test: ``(N_test, num_features)`` float features (or token ids, as ``x_train``).
        y_test: test targets, as ``y_train``.
        num_features: number of input features per example.
        num_classes: number of classes (0 for regression).
        name: short name of the data set (e.g. ``"digits"``).
        task: ``"classification"`` or ``"regression"``.
        input_shape: the unflattened shape of one example, e.g. ``(1, 8, 8)`` for image models;
            ``None`` means a plain vector of ``num_features``.
        vocab_size: ``None`` for float features; for token inputs the number of token ids, the inputs
            being int64 in ``[0, vocab_size)`` (the runner passes it to a model builder's ``vocab_size``).
        evaluated_on: ``"test"``, or ``"validation"`` when the test part holds a validation part carved from
            the training data (:func:`curvlab.validation.validation_split`; ``[data] val_fraction``).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_features: int
    num_classes: int
    name: str
    task: str = "classification"
    input_shape: tuple[int, ...] | None = None
    vocab_size: int | None = None
    evaluated_on: str = "test"

    def __post_init__(self) -> None:
        if self.task not in ("classification", "regression"):
            raise DatasetError(f"Split.task must be 'classification' or 'regression', got {self.task!r}")
        if self.vocab_size is not None:
            for part in ("x_train", "x_test"):
                if getattr(self, part).dtype != torch.int64:
                    raise DatasetError(f"Split.{part} must hold int64 token ids when vocab_size is set, "
                                       f"got {getattr(self, part).dtype}")

    @property
    def tokens(self) -> bool:
        """True when the inputs are integer token ids (``vocab_size`` is set)."""
        return self.vocab_size is not None

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])

    @property
    def num_outputs(self) -> int:
        """Model outputs the targets need: classes, or the regression target dimension."""
        if self.task == "classification":
            return self.num_classes
        return int(self.y_train[0].numel())

    @property
    def example_shape(self) -> tuple[int, ...]:
        """``input_shape`` if set, else ``(num_features,)``."""
        return tuple(self.input_shape) if self.input_shape else (self.num_features,)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Split:
        """A copy with features (and regression targets) in ``dtype`` on ``device``; class labels and token
        ids keep their int64 dtype."""
        def conv(t: torch.Tensor, is_target: bool) -> torch.Tensor:
            keep_dtype = self.task == "classification" if is_target else self.tokens
            return t.to(device=device, dtype=None if keep_dtype else dtype)
        return replace(self, x_train=conv(self.x_train, False), y_train=conv(self.y_train, True),
                       x_test=conv(self.x_test, False), y_test=conv(self.y_test, True))


def standardize(x_train: torch.Tensor, x_test: torch.Tensor, eps: float = 1e-12
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize both parts per feature with the mean and std of ``x_train``.

    Features that are constant on the training set (std <= ``eps``) are only centred (their std is
    taken as 1), so no division by zero happens.
    """
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True)
    std = torch.where(std > eps, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def normalize_features(x_train: torch.Tensor, x_test: torch.Tensor, normalize: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``"standardize"``: per feature (:func:`standardize`); ``"global"``: one scalar mean and std over
    every training entry (what MNIST code usually does: per-pixel std is tiny at rarely-inked pixels);
    ``"none"``: unchanged.  Statistics come from the train part only, accumulated in float64."""
    if normalize == "standardize":
        return standardize(x_train, x_test)
    if normalize == "global":
        mean = float(x_train.mean(dtype=torch.float64))
        std = float((x_train.double() - mean).square().mean().sqrt()) if x_train.numel() else 1.0
        std = std if std > 1e-12 else 1.0
        return (x_train - mean) / std, (x_test - mean) / std
    if normalize == "none":
        return x_train, x_test
    raise DatasetError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}, got {normalize!r}")


def _require_sklearn():
    """Import scikit-learn or raise an ImportError explaining how to get it."""
    try:
        import sklearn.datasets
        import sklearn.model_selection
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "curvlab.data needs scikit-learn for its bundled data sets; "
            "install it with `pip install scikit-learn` (or `pip install curvlab[data]`)."
        ) from err
    return sklearn


@register_dataset("digits")
def load_digits(seed: int = 0, test_fraction: float = 0.25, normalize: str = "standardize",
                dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), offline.

    Images are flattened to 64 features (``input_shape = (1, 8, 8)``) and normalized with training
    statistics. The split is stratified by class and deterministic given ``seed``.

    Args:
        seed: random state of the train/test split.
        test_fraction: fraction of examples in the test part, in (0, 1).
        normalize: one of :data:`NORMALIZATIONS`.
        dtype: floating dtype of the features.

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: if ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    sklearn = _require_sklearn()
    bunch = sklearn.datasets.load_digits()
    x, y = bunch.data, bunch.target
    x_tr, x_te, y_tr, y_te = sklearn.model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_tr, x_te = normalize_features(torch.as_tensor(x_tr, dtype=torch.float64),
                                    torch.as_tensor(x_te, dtype=torch.float64), normalize)
    return Split(x_train=x_tr.to(dtype).contiguous(), y_train=torch.as_tensor(y_tr, dtype=torch.int64),
                 x_test=x_te.to(dtype).contiguous(), y_test=torch.as_tensor(y_te, dtype=torch.int64),
                 num_features=int(x.shape[1]), num_classes=int(len(bunch.target_names)), name="digits",
                 input_shape=(1, 8, 8))


@register_dataset("mnist1d")
def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8, generation_seed: int = 42,
                 normalize: str = "none", cache_dir: str | None = None,
                 dtype: torch.dtype = torch.float32) -> Split:
    """MNIST-1D (Greydanus, "Scaling down deep learning", 2020): 10 classes of 40-sample 1-D signals.

    Generated procedurally by the ``mnist1d`` package (``get_dataset(args, path, download=False,
    regenerate=...)``: nothing is downloaded). With the defaults this is the canonical data set
    (5000 examples, seed 42, first 80% train). ``cache_dir=None`` generates into a temporary directory
    (about 2 s); a ``cache_dir`` keeps the generated pickle there and reuses it. The package seeds
    numpy's and ``random``'s GLOBAL generators; their states are restored afterwards.
    ``input_shape = (1, 40)`` (one channel); ``normalize="none"`` keeps the package's own scaling
    (zero mean, unit std over the whole set).

    Raises:
        ImportError: if ``mnist1d`` (and its import-time dependency ``requests``) is not installed.
    """
    try:
        import mnist1d
    except ImportError as err:
        raise ImportError("the 'mnist1d' data set needs the mnist1d package (it imports requests): "
                          "`pip install mnist1d requests`") from err
    if not (isinstance(num_samples, int) and num_samples >= 20):
        raise DatasetError(f"num_samples must be an integer >= 20, got {num_samples!r}")
    if not 0.0 < train_split < 1.0:
        raise DatasetError(f"train_split must be in (0, 1), got {train_split}")
    args = mnist1d.get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, generation_seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        if cache_dir is None:
            with tempfile.TemporaryDirectory(prefix="curvlab-mnist1d-") as tmp:
                data = mnist1d.get_dataset(args, path=os.path.join(tmp, "mnist1d.pkl"), verbose=False,
                                           download=False, regenerate=True)
        else:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            path = Path(cache_dir) / f"mnist1d_n{num_samples}_s{generation_seed}_t{train_split}.pkl"
            data = mnist1d.get_dataset(args, path=str(path), verbose=False, download=False,
                                       regenerate=not path.is_file())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x_tr, x_te = normalize_features(torch.as_tensor(data["x"], dtype=torch.float64),
                                    torch.as_tensor(data["x_test"], dtype=torch.float64), normalize)
    return Split(x_train=x_tr.to(dtype).contiguous(), y_train=torch.as_tensor(data["y"], dtype=torch.int64),
                 x_test=x_te.to(dtype).contiguous(), y_test=torch.as_tensor(data["y_test"], dtype=torch.int64),
                 num_features=int(x_tr.shape[1]), num_classes=10, name="mnist1d",
                 input_shape=(1, int(x_tr.shape[1])))


@register_dataset("mnist")
def load_mnist(dir: str = "../shared/data/mnist", normalize: str = "global", num_train: int | None = None,
               num_test: int | None = None, dtype: torch.dtype = torch.float32) -> Split:
    """MNIST (LeCun et al. 1998) from a directory holding the four standard IDX files, gzipped or not.

    Pixels are scaled to [0, 1] and then normalized with training statistics (``"global"``: one scalar
    mean/std, the usual MNIST practice; ``"none"`` keeps [0, 1], e.g. for the autoencoder). The split is
    the standard one (60,000 / 10,000); ``num_train`` / ``num_test`` keep the first examples of each part
    (deterministic subsets for quick runs). ``input_shape = (1, 28, 28)``.

    Raises:
        DatasetError: naming the directory or the missing / malformed file (see :mod:`curvlab.experiments.idx`).
    """
    from .experiments.idx import read_mnist_dir

    arrays = read_mnist_dir(dir)
    if normalize not in NORMALIZATIONS:
        raise DatasetError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}, got {normalize!r}")
    images, ys = {}, {}
    for part, limit, arg in (("train", num_train, "num_train"), ("test", num_test, "num_test")):
        img, lab = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if limit is not None:
            if isinstance(limit, bool) or not (isinstance(limit, int) and 1 <= limit <= len(lab)):
                raise DatasetError(f"{arg} must be an integer in [1, {len(lab)}] or None, got {limit!r}")
            img, lab = img[:limit], lab[:limit]
        images[part], ys[part] = img.reshape(len(img), -1), torch.from_numpy(lab.astype(np.int64))
    # Statistics in float64 from the uint8 pixels, accumulated per feature over row chunks (no float64
    # copy of the whole set), then the scaling is applied in place on float32 arrays: the 60k set loads
    # in about a second.
    train = images["train"]
    sums, squares = np.zeros(train.shape[1]), np.zeros(train.shape[1])
    for start in range(0, len(train), 8192):
        chunk = train[start:start + 8192].astype(np.float64) / 255.0
        sums += chunk.sum(axis=0)
        squares += np.einsum("ij,ij->j", chunk, chunk)
    n = max(len(train), 1)
    if normalize == "global":
        mean = sums.sum() / (n * train.shape[1])
        std = float(np.sqrt(max(squares.sum() / (n * train.shape[1]) - mean ** 2, 0.0))) or 1.0
    elif normalize == "standardize":
        mean = sums / n
        std = np.sqrt(np.maximum(squares / n - mean ** 2, 0.0))
        std = np.where(std > 1e-6, std, 1.0)
    else:
        mean, std = 0.0, 1.0
    xs = {}
    for part, img in images.items():
        x = img.astype(np.float32)
        x /= np.float32(255.0)
        x -= np.asarray(mean, dtype=np.float32)
        x /= np.asarray(std, dtype=np.float32)
        xs[part] = torch.from_numpy(x).to(dtype)
    x_tr, x_te = xs["train"], xs["test"]
    side = arrays["train_images"].shape[1:]
    return Split(x_train=x_tr.to(dtype).contiguous(), y_train=ys["train"], x_test=x_te.to(dtype).contiguous(),
                 y_test=ys["test"], num_features=int(x_tr.shape[1]), num_classes=10, name="mnist",
                 input_shape=(1, *map(int, side)))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Return an iterator over ``(xb, yb)`` minibatches covering every example once.

    With ``shuffle`` a fresh permutation is drawn (from ``generator`` when given) each time this
    function is called; the last, possibly smaller, batch is kept. A ``batch_size`` at least the data
    set size gives one batch of everything (full-batch training).

    Raises:
        ValueError: if ``batch_size < 1`` or ``x`` and ``y`` differ in length (raised when called, not
            on first iteration).
    """
    try:
        size = operator.index(batch_size)
    except TypeError:
        size = 0
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x and y must have the same length, got {n} and {y.shape[0]}")
    return _iter_batches(x, y, size, shuffle, generator)


def _iter_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                  generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Generator behind :func:`batches` (split off so argument errors raise eagerly)."""
    n = x.shape[0]
    if shuffle:
        order = torch.randperm(n, generator=generator, device="cpu").to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
    else:
        for start in range(0, n, batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]


from .experiments import synthetic as _synthetic  # noqa: E402,F401  (registers regression, teacher_student)
from .experiments import sequences as _sequences  # noqa: E402,F401  (registers modular, chars)
