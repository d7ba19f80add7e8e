"""Parameterizations: per-layer init, learning-rate and damping multipliers from width.

A parameterization's :meth:`Parameterization.configure` runs once when the optimizer is created and may
re-initialize the model and set each unit's ``lr_mult`` / ``damping_mult``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..hyper import Option
from ..registry import register_scaling
from ..units import Unit


class Parameterization:
    options: dict[str, Option] = {}

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @classmethod
    def defaults_for(cls, estimator: str, rule: str, config: dict[str, Any]) -> dict[str, Any]:
        """Defaults this parameterization sets for options the user did not pass, for an (estimator, rule) pair,
        over the estimator's and the rule's (:func:`curvlab.hyper.declared_defaults`). ``config``: the options
        resolved without the components' defaults. None here."""
        return {}

    def configure(self, model: nn.Module, units: list[Unit], estimator: str, rule: str) -> None:
        raise NotImplementedError


@register_scaling("standard")
class Standard(Parameterization):
    """The model as built: no re-initialization, every multiplier 1."""

    def configure(self, model: nn.Module, units: list[Unit], estimator: str, rule: str) -> None:
        for unit in units:
            unit.lr_mult = unit.damping_mult = 1.0


from . import mup  # noqa: E402,F401  (registers scaling="mup")
