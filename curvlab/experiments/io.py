"""Atomic files: a reader never sees a half-written result, whatever moment a run is killed.

Every write goes to a temporary file in the same directory, is flushed and fsync'ed, and then replaces
the target with ``os.replace`` (atomic on POSIX and Windows). JSON is written strictly: non-finite
floats become ``null`` (a diverged run is flagged in its summary instead).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "write_jsonl", "read_jsonl",
           "read_json", "finite_or_none", "atomic_torch_save", "load_torch", "CorruptCheckpoint"]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(obj: Any) -> Any:
    """A copy of ``obj`` with NaN / Inf floats replaced by None (strict JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write every row as one JSON line, atomically (the whole file is replaced)."""
    atomic_write_text(path, "".join(json.dumps(finite_or_none(r), allow_nan=False) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a torch file); the message names it."""


def load_torch(path: str | Path, weights_only: bool = False) -> Any:
    """``torch.load`` that refuses an unreadable file with a message naming it and the remedy.

    :func:`atomic_torch_save` never leaves a half-written file, but a file can still be damaged outside curvlab
    (disk full on another writer, a copy cut short)."""
    import torch

    try:
        return torch.load(path, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise CorruptCheckpoint(
            f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}): it is truncated or corrupt; "
            "delete it to start again from scratch"
        ) from err
