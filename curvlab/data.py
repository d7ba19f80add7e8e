"""Small, offline data sets for demos and tests.

Every loader returns a :class:`Split`: standardized, flattened features and int64
labels for a train and a test part.  Loaders are named ``load_<dataset>`` so that
others (``load_mnist``, ``load_mnist1d``, ...) can be added beside
:func:`load_digits`.  :func:`batches` turns tensors into minibatches.
"""
from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Split", "load_digits", "standardize", "batches"]


@dataclass(frozen=True)
class Split:
    """A train/test split of a classification data set.

    Attributes:
        x_train: ``(N_train, num_features)`` float features.
        y_train: ``(N_train,)`` int64 class labels.
        x_test: ``(N_test, num_features)`` float features.
        y_test: ``(N_test,)`` int64 class labels.
        num_features: number of input features per example.
        num_classes: number of classes.
        name: short name of the data set (e.g. ``"digits"``).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_features: int
    num_classes: int
    name: str

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.x_test.shape[0])


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


def standardize(
    x_train: torch.Tensor, x_test: torch.Tensor, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardize both parts per feature with the mean and std of ``x_train``.

    Features that are constant on the training set (std <= ``eps``) are only
    centred (their std is taken as 1), so no division by zero happens.
    """
    mean = x_train.mean(dim=0, keepdim=True)
    std = x_train.std(dim=0, keepdim=True)
    std = torch.where(std > eps, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits(
    seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float32
) -> Split:
    """The scikit-learn 8x8 handwritten digits (1797 images, 10 classes), offline.

    Images are flattened to 64 features and standardized with the training
    mean/std per feature.  The split is stratified by class and deterministic
    given ``seed``.

    Args:
        seed: random state of the train/test split.
        test_fraction: fraction of examples in the test part, in (0, 1).
        dtype: floating dtype of the features.

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: if ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    sklearn = _require_sklearn()
    bunch = sklearn.datasets.load_digits()
    x, y = bunch.data, bunch.target
    x_tr, x_te, y_tr, y_te = sklearn.model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    x_tr = torch.as_tensor(x_tr, dtype=torch.float64)
    x_te = torch.as_tensor(x_te, dtype=torch.float64)
    x_tr, x_te = standardize(x_tr, x_te)
    return Split(
        x_train=x_tr.to(dtype).contiguous(),
        y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=x_te.to(dtype).contiguous(),
        y_test=torch.as_tensor(y_te, dtype=torch.int64),
        num_features=int(x.shape[1]),
        num_classes=int(len(bunch.target_names)),
        name="digits",
    )


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Return an iterator over ``(xb, yb)`` minibatches covering every example once.

    With ``shuffle`` a fresh permutation is drawn (from ``generator`` when
    given) each time this function is called; the last, possibly smaller,
    batch is kept.  A ``batch_size`` at least the data set size gives one
    batch of everything.

    Raises:
        ValueError: if ``batch_size < 1`` or ``x`` and ``y`` differ in length
            (raised when called, not on first iteration).
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


def _iter_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Generator behind :func:`batches` (split off so argument errors raise eagerly)."""
    n = x.shape[0]
    if shuffle:
        order = torch.randperm(n, generator=generator, device=x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
    else:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
