"""Output conventions shared by ``analysis/`` and ``paper_figures/`` scripts.

Every figure script writes, into one output directory, each figure as PNG and PDF (:func:`save_figure`)
and the numbers behind it as JSON (:func:`write_numbers`), atomically, so a killed script never leaves a
half-written file. :func:`paper_mode` is the one ``--mode tiny|quick|full`` switch of the paper-figure
scripts (``tiny``: seconds, what the test suite runs; ``quick``: minutes on a CPU; ``full``: a GPU), and
:func:`mnist_or_fallback` loads real MNIST when it is there and says which data it used when it is not.
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from .experiments.io import atomic_write_bytes, atomic_write_json

MODES = ("tiny", "quick", "full")
DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def save_figure(fig: Any, out: str | Path, stem: str, formats: tuple[str, ...] = ("png", "pdf"),
                dpi: int = 120) -> list[Path]:
    """Write a matplotlib ``Figure`` as ``out/stem.<fmt>`` for each format; returns the paths."""
    out = Path(out)
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi)
        path = out / f"{stem}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def write_numbers(out: str | Path, stem: str, numbers: Any) -> Path:
    """Write the numbers behind a figure as ``out/stem.json`` (NaN/Inf become null)."""
    path = Path(out) / f"{stem}.json"
    atomic_write_json(path, numbers)
    return path


def paper_mode_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The common command line of a paper-figure script: ``--mode``, ``--out``, ``--data-dir``, ``--seed``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--mode", choices=MODES, default="quick",
                   help="tiny: seconds (the test suite); quick: minutes on a CPU (default); full: a GPU")
    p.add_argument("--out", default=default_out, help="output directory (created)")
    p.add_argument("--data-dir", default=None,
                   help=f"directory with the four MNIST IDX files (default: {DEFAULT_MNIST} when present)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    return p


def mnist_or_fallback(data_dir: str | Path | None, *, num_train: int | None = None, num_test: int | None = None,
                      normalize: str = "global", fallback: str = "digits", quiet: bool = False):
    """Real MNIST from ``data_dir`` (or the shared copy), else the ``fallback`` dataset, said out loud.

    Returns ``(split, name)``. ``fallback="digits"`` is scikit-learn's 8x8 digits (1797 examples);
    passing an explicit ``data_dir`` that does not hold MNIST raises instead of falling back.
    """
    from .data import load_digits, load_mnist

    directory = Path(data_dir) if data_dir is not None else DEFAULT_MNIST
    if data_dir is not None or directory.is_dir():
        return load_mnist(str(directory), normalize=normalize, num_train=num_train, num_test=num_test), "mnist"
    if not quiet:
        print(f"MNIST not found at {directory}: using {fallback!r} instead (pass --data-dir for real MNIST)")
    if fallback != "digits":
        raise ValueError(f"unknown fallback {fallback!r}")
    return load_digits(normalize="none" if normalize == "none" else "standardize"), "digits"


def mnist_data_config(data_dir: str | Path | None, num_train: int | None = None,
                      num_test: int | None = None) -> tuple[dict[str, Any], str]:
    """The experiment config's ``[data]`` table for the same choice as :func:`mnist_or_fallback`: MNIST when
    present (``num_train`` / ``num_test`` subsets), else scikit-learn's digits, said out loud. Returns
    ``(table, dataset name)``."""
    directory = Path(data_dir) if data_dir is not None else DEFAULT_MNIST
    if data_dir is not None or directory.is_dir():
        cfg: dict[str, Any] = {"name": "mnist", "dir": str(directory)}
        cfg.update({k: v for k, v in (("num_train", num_train), ("num_test", num_test)) if v is not None})
        return cfg, "mnist"
    print(f"MNIST not found at {directory}: using 'digits' instead (pass --data-dir for real MNIST)")
    return {"name": "digits"}, "digits"
