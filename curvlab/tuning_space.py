"""The search space of a tuning run (:mod:`curvlab.tuning`): its declaration, validation and grid.

Each name maps to ``{low, high}`` (uniform; ``log = true`` for a log-uniform range, ``step`` for a discretized
one; integers when ``low`` and ``high`` are integers), ``{choices = [...]}`` (or a bare list) for a categorical,
and ``num`` (points of a range under the ``grid`` sampler, log-spaced with ``log``). :func:`parse_space` validates
a space into :class:`Param` objects (a bad spec raises :class:`TuneError` naming the parameter and the remedy),
:meth:`Param.suggest` draws a value for an Optuna trial, :meth:`Param.grid_values` lists the grid sampler's points
and :func:`grid_size` counts them; :func:`space_to_json` is the JSON form written into tuning records.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["TuneError", "Param", "parse_space", "space_to_json", "grid_size", "finite_number"]

_SPEC_KEYS = {"low", "high", "log", "step", "choices", "num"}


class TuneError(ValueError):
    """Invalid tuning input; the message names the argument and the remedy."""


@dataclass(frozen=True)
class Param:
    """One dimension of a search space (see the module docstring)."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] | None = None
    num: int | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) and not isinstance(v, bool)
                                            for v in (self.low, self.high))

    def suggest(self, trial: Any) -> Any:
        """The value of this parameter for an Optuna ``trial``."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """The values of this parameter under the ``grid`` sampler."""
        if self.choices is not None:
            return list(self.choices)
        if self.num is None:
            raise TuneError(f"search space {self.name!r}: the grid sampler needs discrete values; give "
                            f"choices = [...] or num = <points> for the range [{self.low}, {self.high}]")
        if self.num == 1:
            return [self.low]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            values = [math.exp(a + (b - a) * i / (self.num - 1)) for i in range(self.num)]
        else:
            values = [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]
        return sorted({round(v) for v in values}) if self.is_int else [float(f"{v:.12g}") for v in values]

    def to_json(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        for key in ("step", "num"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def finite_number(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_param(name: str, spec: Any) -> Param:
    where = f"search space {name!r}"
    if isinstance(spec, (list, tuple)):
        spec = {"choices": list(spec)}
    if not isinstance(spec, Mapping):
        raise TuneError(f"{where}: expected a table such as {{low = 1e-3, high = 1, log = true}} or "
                        f"{{choices = [0.0, 0.9]}}, got {spec!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise TuneError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(_SPEC_KEYS))}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise TuneError(f"{where}: choices cannot be combined with {', '.join(extra)}; give either choices or "
                            "a range {low, high}")
        choices = spec["choices"]
        if not isinstance(choices, (list, tuple)) or not choices:
            raise TuneError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if not (c is None or isinstance(c, (bool, int, float, str))):
                raise TuneError(f"{where}: choice {c!r} is not a number, string, boolean or null (Optuna "
                                "categoricals hold scalars only)")
        if len(set(map(repr, choices))) != len(choices):
            raise TuneError(f"{where}: choices {list(choices)!r} repeat a value")
        return Param(name, choices=tuple(choices))
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        raise TuneError(f"{where}: missing {' and '.join(missing)}; a range needs both low and high "
                        "(or give choices = [...])")
    low, high, log = spec["low"], spec["high"], spec.get("log", False)
    if not (finite_number(low) and finite_number(high)):
        raise TuneError(f"{where}: low and high must be finite numbers, got low={low!r}, high={high!r}")
    if not low < high:
        raise TuneError(f"{where}: low must be below high, got low={low!r}, high={high!r}")
    if not isinstance(log, bool):
        raise TuneError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise TuneError(f"{where}: a log range needs low > 0, got low={low!r}; use log = false or a positive low")
    step, num = spec.get("step"), spec.get("num")
    if step is not None:
        if not finite_number(step) or step <= 0:
            raise TuneError(f"{where}: step must be a positive number, got {step!r}")
        if log:
            raise TuneError(f"{where}: step and log = true cannot be combined (Optuna draws either a stepped or a "
                            "log range); drop one")
    if num is not None and (not isinstance(num, int) or isinstance(num, bool) or num < 1):
        raise TuneError(f"{where}: num (grid points) must be an integer >= 1, got {num!r}")
    return Param(name, low=low, high=high, log=log, step=step, num=num)


def parse_space(space: Mapping[str, Any]) -> dict[str, Param]:
    """Validate a search space (``{name: spec}``, see the module docstring) into :class:`Param` objects.

    Raises:
        TuneError: an empty space or a bad spec, naming the parameter.
    """
    if isinstance(space, Mapping) and all(isinstance(p, Param) for p in space.values()) and space:
        return dict(space)
    if not isinstance(space, Mapping) or not space:
        raise TuneError("the search space is empty: give at least one parameter, e.g. "
                        "{'optimizer.lr': {'low': 1e-3, 'high': 1, 'log': True}}")
    return {str(name): _parse_param(str(name), spec) for name, spec in space.items()}


def space_to_json(space: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a (parsed or raw) search space."""
    return {name: p.to_json() for name, p in parse_space(space).items()}


def grid_size(space: Mapping[str, Any]) -> int:
    """Number of points of the space under the ``grid`` sampler."""
    return math.prod(len(p.grid_values()) for p in parse_space(space).values())

