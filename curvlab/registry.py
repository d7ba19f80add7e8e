"""The registry: every component a user can name, and how third-party packages add their own.

Four kinds of components are registered by name:

* ``estimator``  -- a :class:`curvlab.curvature.Estimator` subclass (kfac, identity, ...);
* ``rule``       -- a :class:`curvlab.rules.UpdateRule` subclass (natural, ...);
* ``scaling``    -- a :class:`curvlab.scalings.Parameterization` subclass (standard, ...);
* ``adapter``    -- a :class:`curvlab.adapters.LayerAdapter` subclass (Linear, Conv2d, ...);
* ``dataset``    -- a loader function returning a :class:`curvlab.data.Split` (experiments);
* ``model``      -- a model builder function (experiments).

Register with the public decorators::

    @curvlab.register_estimator("my_kfac")
    class MyKFAC(curvlab.Estimator): ...

Third-party packages are discovered through the entry-point group ``curvlab.plugins``: each entry point
names a module (imported, so its decorators run) or a callable (called with no arguments). Plugins are
loaded once, the first time a name is looked up or listed.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import logging
from typing import Callable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

ENTRY_POINT_GROUP = "curvlab.plugins"


class Registry:
    """A name -> component table for one kind of component, with helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type] = {}

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[T], T]:
        """Class decorator registering ``cls`` under ``name`` (lower case, unique unless ``overwrite``)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} name must be a non-empty string, got {name!r}")
        key = name.lower()

        def decorator(cls: T) -> T:
            if key in self._items and self._items[key] is not cls and not overwrite:
                raise ValueError(
                    f"{self.kind} {key!r} is already registered by {self._items[key].__module__}."
                    f"{self._items[key].__qualname__}; pass overwrite=True to replace it"
                )
            self._items[key] = cls
            cls.registry_name = key  # type: ignore[attr-defined]
            return cls

        return decorator

    def get(self, name: str) -> type:
        """The component registered as ``name``; ValueError with a "did you mean" otherwise."""
        load_plugins()
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} must be given by name (a string), got {type(name).__name__}")
        key = name.lower()
        if key not in self._items:
            close = difflib.get_close_matches(key, list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._items))}."
            )
        return self._items[key]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._items)

    def items(self) -> Iterator[tuple[str, type]]:
        load_plugins()
        return iter(sorted(self._items.items()))

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return isinstance(name, str) and name.lower() in self._items


ESTIMATORS = Registry("estimator")
RULES = Registry("rule")
SCALINGS = Registry("scaling")
ADAPTERS = Registry("adapter")
DATASETS = Registry("dataset")
MODELS = Registry("model")

register_estimator = ESTIMATORS.register
register_rule = RULES.register
register_scaling = SCALINGS.register
register_adapter = ADAPTERS.register
register_dataset = DATASETS.register
register_model = MODELS.register

_plugins_loaded = False
plugin_errors: dict[str, str] = {}


def load_plugins(force: bool = False) -> None:
    """Import every entry point of the group ``curvlab.plugins`` (once).

    A plugin that fails to import is reported (logged, and kept in :data:`plugin_errors`) and skipped,
    so one broken third-party package never makes the built-in components unusable.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:  # a broken plugin must not break curvlab
            plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("curvlab plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)


def describe() -> str:
    """A readable listing of everything registered (what ``curvlab list`` prints)."""
    lines = []
    for reg in (ESTIMATORS, RULES, SCALINGS, ADAPTERS, DATASETS, MODELS):
        if not reg._items:
            continue
        lines.append(f"{reg.kind}s:")
        for name, cls in reg.items():
            doc = (cls.__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
            lines.append(f"  {name:<14} {summary}")
    if plugin_errors:
        lines.append("plugins that failed to load:")
        lines.extend(f"  {name}: {err}" for name, err in sorted(plugin_errors.items()))
    return "\n".join(lines)
