"""Synthetic data sets: a linear-teacher regression and a random-MLP teacher-student problem.

Both draw from a private ``torch.Generator`` seeded with ``seed`` (never the global RNG), so the same
arguments give the same tensors bit for bit; train and test examples are independent draws.

* ``regression``: ``x ~ N(0, I_F)``, ``y = x W + b + noise * eps`` with ``W ~ N(0, 1/F)``: a well-posed
  least-squares problem whose optimal MSE is ``noise**2`` (per output entry).
* ``teacher_student``: a random ``tanh`` MLP teacher (weights ``N(0, 1/fan_in)``) maps ``x ~ N(0, I_F)``
  to ``num_classes`` outputs, centred by their TRAIN mean so that the classes are roughly balanced; the
  label is the argmax of the outputs plus ``noise * eps`` (classification), or the outputs plus noise are
  the targets (``task="regression"``). A student of the teacher's shape can fit it exactly.
"""
from __future__ import annotations

import torch

from ..data import DatasetError, Split
from ..registry import register_dataset

__all__ = ["load_regression", "load_teacher_student"]


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError(f"{name} must be a positive integer, got {value!r}")


def _check_noise(noise: float) -> None:
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        raise DatasetError(f"noise must be a number >= 0, got {noise!r}")


@register_dataset("regression")
def load_regression(num_train: int = 1024, num_test: int = 512, num_features: int = 16, num_outputs: int = 1,
                    noise: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """Linear-teacher regression ``y = x W + b + noise * eps`` (float targets ``(N, num_outputs)``)."""
    _check_sizes(num_train=num_train, num_test=num_test, num_features=num_features, num_outputs=num_outputs)
    _check_noise(noise)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_features, num_outputs, generator=gen, dtype=torch.float64) / num_features ** 0.5
    bias = torch.randn(num_outputs, generator=gen, dtype=torch.float64)
    parts = []
    for n in (num_train, num_test):
        x = torch.randn(n, num_features, generator=gen, dtype=torch.float64)
        y = x @ weight + bias + noise * torch.randn(n, num_outputs, generator=gen, dtype=torch.float64)
        parts.append((x.to(dtype), y.to(dtype)))
    (x_tr, y_tr), (x_te, y_te) = parts
    return Split(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_features=num_features,
                 num_classes=0, name="regression", task="regression")


def _teacher(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = torch.tanh(x)
    return x


@register_dataset("teacher_student")
def load_teacher_student(num_train: int = 2048, num_test: int = 512, num_features: int = 16,
                         num_classes: int = 10, teacher_width: int = 32, teacher_depth: int = 2,
                         noise: float = 0.0, task: str = "classification", seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> Split:
    """Inputs labelled by a random tanh-MLP teacher (see the module docstring).

    ``num_classes`` is the teacher's output size: classes for ``task="classification"``, the target
    dimension for ``task="regression"``.
    """
    _check_sizes(num_train=num_train, num_test=num_test, num_features=num_features, num_classes=num_classes,
                 teacher_width=teacher_width)
    if isinstance(teacher_depth, bool) or not isinstance(teacher_depth, int) or teacher_depth < 0:
        raise DatasetError(f"teacher_depth must be an integer >= 0, got {teacher_depth!r}")
    _check_noise(noise)
    if task not in ("classification", "regression"):
        raise DatasetError(f"task must be 'classification' or 'regression', got {task!r}")
    if task == "classification" and num_classes < 2:
        raise DatasetError(f"num_classes must be >= 2 for classification, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    sizes = [num_features] + [teacher_width] * teacher_depth + [num_classes]
    layers = [(torch.randn(i, o, generator=gen, dtype=torch.float64) / i ** 0.5,
               0.1 * torch.randn(o, generator=gen, dtype=torch.float64)) for i, o in zip(sizes[:-1], sizes[1:])]
    x_tr = torch.randn(num_train, num_features, generator=gen, dtype=torch.float64)
    x_te = torch.randn(num_test, num_features, generator=gen, dtype=torch.float64)
    out_tr, out_te = _teacher(x_tr, layers), _teacher(x_te, layers)
    centre = out_tr.mean(dim=0, keepdim=True)
    out_tr = out_tr - centre + noise * torch.randn(out_tr.shape, generator=gen, dtype=torch.float64)
    out_te = out_te - centre + noise * torch.randn(out_te.shape, generator=gen, dtype=torch.float64)
    if task == "classification":
        y_tr, y_te, classes = out_tr.argmax(dim=1), out_te.argmax(dim=1), num_classes
    else:
        y_tr, y_te, classes = out_tr.to(dtype), out_te.to(dtype), 0
    return Split(x_train=x_tr.to(dtype), y_train=y_tr, x_test=x_te.to(dtype), y_test=y_te,
                 num_features=num_features, num_classes=classes, name="teacher_student", task=task)
