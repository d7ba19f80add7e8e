"""Per-section wall-clock accounting of an optimizer step (used by :mod:`curvlab.bench`).

``opt.sections = Sections(sync)`` makes :class:`curvlab.optim.CurvlabOptimizer` time the parts of its
step: ``"statistics"`` (turning captured records into statistics and folding them in), ``"refresh"``
(inverses / roots) and ``"precondition"`` (the rule's plan: solves, momentum, the update). ``sync`` is
called at each boundary (``torch.cuda.synchronize`` on a GPU, so asynchronous kernels are charged to
the section that launched them). With ``opt.sections = None`` (the default) nothing is measured.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator


class Sections:
    """Accumulated seconds and call counts per named section."""

    def __init__(self, sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync, self.clock = sync, clock
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync is not None:
            self.sync()
        start = self.clock()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + self.clock() - start
            self.calls[name] = self.calls.get(name, 0) + 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


_NULL = contextlib.nullcontext()


def section(sections: Sections | None, name: str):
    """``sections(name)`` when accounting is on, else a shared no-op context."""
    return _NULL if sections is None else sections(name)
