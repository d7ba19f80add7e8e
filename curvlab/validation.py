"""Validation splits carved from the training data, so that selection never reads the test set.

Model selection (tuning learning rate, damping, ...) must not look at the data the result is reported on;
the usual protocol holds out a validation part of the TRAINING set (e.g. Goodfellow, Bengio & Courville,
*Deep Learning*, 2016, sec. 5.3.1). Two entry points:

* :func:`carve_validation` splits in-memory training tensors ``(x, y)`` into a fitting part and a validation
  part (seeded; stratified by class on request). The paper-figure scripts use it in-process.
* the ``[data]`` keys :data:`VAL_KEYS`, accepted by every registered data set (the loader's own arguments are
  untouched): ``val_fraction`` (> 0 switches it on), ``val_seed`` and ``evaluate_on``. With
  ``evaluate_on = "validation"`` (the default) the run trains on the fitting part and its "test" metrics are
  measured on the validation part -- the test tensors are dropped before training and never evaluated; with
  ``evaluate_on = "test"`` it trains on the same fitting part and is evaluated on the real test set (the
  final re-runs of a tuned configuration). Classification labels of shape ``(N,)`` are stratified.

Normalization statistics stay those of the loader (computed over the whole training part, validation
examples included); the test set contributes nothing to them either way.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

__all__ = ["VAL_KEYS", "EVALUATE_ON", "validation_indices", "carve_validation", "validation_split",
           "resolve_val_keys", "pop_val_keys"]

#: ``[data]`` keys that every registered data set accepts (kept out of the loader's arguments).
VAL_KEYS = ("val_fraction", "val_seed", "evaluate_on")
#: ``data.evaluate_on`` values.
EVALUATE_ON = ("validation", "test")


def _check_fraction(fraction: Any, name: str = "val_fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {fraction!r}; e.g. 0.2 holds out a fifth "
                         "of the training examples for validation")
    return float(fraction)


def validation_indices(n: int, fraction: float, seed: int = 0, labels: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, val)``: disjoint, sorted int64 index tensors covering ``range(n)``, ``val`` holding about
    ``fraction * n`` of them, drawn with a private generator seeded by ``seed``.

    With ``labels`` (1-D class labels) the draw is stratified: each class gives ``round(fraction * count)``
    of its examples (so class proportions are kept).

    Raises:
        ValueError: ``fraction`` not in (0, 1), labels of the wrong length, or a split that leaves either part
            empty.
    """
    fraction = _check_fraction(fraction)
    gen = torch.Generator().manual_seed(int(seed))
    if labels is None:
        k = int(round(fraction * n))
        val = torch.randperm(n, generator=gen)[:k]
    else:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must be 1-D with {n} entries to stratify, got shape {tuple(labels.shape)}")
        parts = []
        for cls in torch.unique(labels, sorted=True):
            members = torch.nonzero(labels == cls).flatten()
            take = int(round(fraction * len(members)))
            parts.append(members[torch.randperm(len(members), generator=gen)[:take]])
        val = torch.cat(parts)
    if len(val) == 0 or len(val) == n:
        raise ValueError(f"val_fraction={fraction} of {n} training examples leaves "
                         f"{'no validation' if len(val) == 0 else 'no training'} examples; choose a fraction "
                         "between 1/n and 1 - 1/n")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[val] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def carve_validation(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0, stratify: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_fit, y_fit, x_val, y_val)``: the training tensors split by :func:`validation_indices`
    (``stratify=True`` stratifies by the 1-D class labels ``y``). Row order within each part is kept."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
    fit, val = validation_indices(x.shape[0], fraction, seed, y if stratify else None)
    return x[fit], y[fit], x[val], y[val]


def validation_split(split: Any, val_fraction: float, val_seed: int = 0, evaluate_on: str = "validation") -> Any:
    """A :class:`curvlab.data.Split` whose training part is the fitting part of ``split``'s and whose test part
    is the validation part (``evaluate_on="validation"``; the test tensors are dropped) or the original test
    set (``"test"``). Classification labels ``(N,)`` are stratified."""
    if evaluate_on not in EVALUATE_ON:
        raise ValueError(f"evaluate_on must be one of {', '.join(map(repr, EVALUATE_ON))}, got {evaluate_on!r}")
    stratify = split.task == "classification" and split.y_train.dim() == 1
    x_fit, y_fit, x_val, y_val = carve_validation(split.x_train, split.y_train, val_fraction, val_seed, stratify)
    if evaluate_on == "test":
        return replace(split, x_train=x_fit, y_train=y_fit)
    return replace(split, x_train=x_fit, y_train=y_fit, x_test=x_val, y_test=y_val, evaluated_on="validation")


def resolve_val_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`VAL_KEYS` of a ``[data]`` table, validated and completed: ``{}`` when ``val_fraction`` is
    absent or 0 (so configurations without a validation split keep their run ids).

    Raises:
        ValueError: naming the key (a bad fraction, seed or ``evaluate_on``, or ``val_seed``/``evaluate_on``
            without ``val_fraction``).
    """
    fraction = data.get("val_fraction", 0) or 0
    if not fraction:
        extra = [k for k in VAL_KEYS[1:] if k in data]
        if extra:
            raise ValueError(f"data.{extra[0]} needs data.val_fraction > 0 (the share of the training set held out "
                             "for validation)")
        return {}
    fraction = _check_fraction(fraction, "data.val_fraction")
    seed = data.get("val_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"data.val_seed must be an integer >= 0, got {seed!r}")
    evaluate_on = data.get("evaluate_on", "validation")
    if evaluate_on not in EVALUATE_ON:
        raise ValueError(f"data.evaluate_on must be one of {', '.join(map(repr, EVALUATE_ON))}, got {evaluate_on!r}")
    return {"val_fraction": fraction, "val_seed": seed, "evaluate_on": evaluate_on}


def pop_val_keys(args: dict[str, Any]) -> dict[str, Any]:
    """Remove the :data:`VAL_KEYS` from a ``[data]`` argument dict (in place); return them resolved."""
    val = resolve_val_keys(args)
    for key in VAL_KEYS:
        args.pop(key, None)
    return val
