"""Hook-based capture backend (placeholder: filled in by the core)."""
from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def is_paused() -> bool:
    """True while inside :func:`paused`: curvlab hooks then record nothing."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def paused():
    """Suspend every curvlab capture hook in this thread (used by :mod:`curvlab.exact`, evaluation code)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
