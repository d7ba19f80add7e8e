"""Per-section accounting of an optimizer step (used by :mod:`curvlab.bench`).

``opt.sections = Sections(sync)`` makes :class:`curvlab.optim.CurvlabOptimizer` time the parts of its
step: ``"statistics"`` (turning captured records into statistics and folding them in), ``"refresh"``
(inverses / roots), ``"precondition"`` (the curvature's products with the gradient: every
:meth:`curvlab.units.Unit.solve` / :meth:`~curvlab.units.Unit.mv`) and ``"rule"`` (the rest of the rule's
plan: combining directions, momentum, the update). Sections nest: the time of an inner section is charged
to it only (exclusive times), so ``"rule"`` excludes the ``"precondition"`` work done inside the plan.
``sync`` is called at each boundary (``torch.cuda.synchronize`` on a GPU, so asynchronous kernels are
charged to the section that launched them). With ``opt.sections = None`` (the default) nothing is measured.

Code that has no handle on the optimizer (the units) reaches the step's accounting through
:func:`active`, which the optimizer sets for the duration of a measured step (:func:`activated`).
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class Sections:
    """Accumulated exclusive seconds and call counts per named section; :attr:`current` is the innermost
    open section (``None`` outside all of them)."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync, self.clock = sync, clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []          # [name, inner seconds to exclude]

    @property
    def current(self) -> str | None:
        return self._stack[-1][0] if self._stack else None

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        frame = [name, 0.0]
        self._stack.append(frame)
        start = self.clock()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = self.clock() - start
            self._stack.pop()
            if self._stack:
                self._stack[-1][1] += elapsed
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - frame[1]
            self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


_NULL = contextlib.nullcontext()
_ACTIVE: Sections | None = None


def section(sections: Sections | None, name: str):
    """``sections(name)`` when accounting is on, else a shared no-op context."""
    return _NULL if sections is None else sections(name)


def active() -> Sections | None:
    """The :class:`Sections` of the optimizer step in progress, if that step is measured."""
    return _ACTIVE


@contextlib.contextmanager
def activated(sections: Sections | None) -> Iterator[None]:
    """Make ``sections`` what :func:`active` returns inside the block (no-op for ``None``)."""
    global _ACTIVE
    if sections is None:
        yield
        return
    previous, _ACTIVE = _ACTIVE, sections
    try:
        yield
    finally:
        _ACTIVE = previous
