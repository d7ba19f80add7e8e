"""The IDX file format of MNIST (LeCun et al., http://yann.lecun.com/exdb/mnist/), read and validated.

An IDX file is a big-endian header -- two zero bytes, a type code (``0x08`` = unsigned byte), the number
of dimensions ``d`` -- then ``d`` 32-bit sizes, then the data. Image files have magic ``0x00000803``
(``d = 3``: count, rows, cols), label files ``0x00000801`` (``d = 1``). Files may be gzipped (detected
from the gzip magic bytes, whatever the name). Parsing is one ``numpy.frombuffer`` (no copy), so the
60,000 training images load in well under a second.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..data import DatasetError

__all__ = ["MNIST_FILES", "read_idx", "read_mnist_dir", "find_idx_file"]

#: The four standard file names (each may also carry a ``.gz`` suffix).
MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_EXPECTED_NDIM = {"images": 3, "labels": 1}


def read_idx(path: str | Path) -> np.ndarray:
    """The uint8 array stored in one IDX file (gzipped or not), validated against its header.

    Raises:
        DatasetError: naming the file when it is not a valid unsigned-byte IDX file (bad gzip stream,
            bad magic number, or a size that disagrees with the header: truncated or padded).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetError(f"{path}: corrupt gzip stream ({err}); re-download the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        magic = raw[:4].hex() if len(raw) >= 4 else repr(raw[:4])
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (magic {magic}, expected 00000801 for "
                           "labels or 00000803 for images)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetError(f"{path}: the header announces shape {dims} ({expected} bytes) but the file holds "
                           f"{len(raw)} bytes: truncated or corrupt; re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz`` (the uncompressed one first), or None."""
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_mnist_dir(directory: str | Path) -> dict[str, np.ndarray]:
    """The four MNIST arrays (``train_images``, ``train_labels``, ``test_images``, ``test_labels``).

    Raises:
        DatasetError: if the directory is missing, a file is missing (all missing ones are named), a file
            is malformed, the image and label counts disagree, or a label is outside 0..9.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"MNIST directory {str(directory)!r} does not exist (or is not a directory); pass the "
                           f"directory holding {', '.join(MNIST_FILES.values())} (each optionally .gz), "
                           "e.g. data.dir=../shared/data/mnist")
    paths = {key: find_idx_file(directory, stem) for key, stem in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] + "[.gz]" for k, p in paths.items() if p is None]
    if missing:
        raise DatasetError(f"MNIST directory {str(directory)!r} lacks {', '.join(missing)}; it must hold the four "
                           "standard IDX files (gzipped or not)")
    arrays = {}
    for key, path in paths.items():
        arr = read_idx(path)  # type: ignore[arg-type]
        kind = key.split("_")[1]
        if arr.ndim != _EXPECTED_NDIM[kind]:
            raise DatasetError(f"{path}: expected {kind} with {_EXPECTED_NDIM[kind]} dimension(s), found shape "
                               f"{arr.shape}; is the file name swapped with another one?")
        arrays[key] = arr
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise DatasetError(f"MNIST {part} part in {str(directory)!r}: {n_img} images but {n_lab} labels")
        if n_lab and int(arrays[f"{part}_labels"].max()) > 9:
            raise DatasetError(f"{paths[part + '_labels']}: labels must lie in 0..9, found "
                               f"{int(arrays[part + '_labels'].max())}")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DatasetError(f"MNIST in {str(directory)!r}: train images are {arrays['train_images'].shape[1:]} but "
                           f"test images are {arrays['test_images'].shape[1:]}")
    return arrays
