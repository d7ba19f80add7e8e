"""Token data sets for transformer workloads: modular arithmetic (grokking) and character-level text.

Both return a :class:`curvlab.data.Split` whose inputs are int64 token ids (``vocab_size`` set; the
runner keeps them integer and passes ``vocab_size`` to the model builder, e.g. ``transformer_lm``).

* ``modular``: the algorithmic data sets of Power et al., "Grokking: Generalization beyond overfitting on
  small algorithmic datasets" (2022, sec. 2 and appendix A.1): every equation ``a op b = c`` with
  ``a, b`` in ``[0, p)``, ``c = (a op b) mod p``; a random ``train_fraction`` of the table is the
  training set, the rest the validation (``test``) set. One label per sequence: the model reads the
  last position (``transformer_lm`` with ``pool = "last"``).
* ``chars``: next-character prediction at every position of windows of a text (default: the bundled
  ``curvlab/data_files/python_reference.txt``, prose from the Python documentation, PSF License v2; see
  ``curvlab/data_files/README``). Targets ``(N, T)``: loss and accuracy are per character.

Everything is deterministic: ``modular`` draws its split from a private ``torch.Generator`` seeded with
``seed``; ``chars`` splits by position in the text (no randomness at all).
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..data import DatasetError, Split
from ..registry import register_dataset

__all__ = ["MODULAR_OPS", "modular_table", "load_modular", "load_chars", "read_corpus", "char_vocabulary",
           "DEFAULT_CORPUS", "model_options_for"]

#: ``op`` values of :func:`load_modular` and the answer ``c`` they compute from ``a, b`` (mod ``p``).
MODULAR_OPS = ("add", "sub", "mul", "div")

#: The bundled corpus of :func:`load_chars` (inside the installed package).
DEFAULT_CORPUS = "python_reference.txt"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, int(p ** 0.5) + 1))


def modular_table(p: int, op: str = "add") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every equation of the table: int64 tensors ``a``, ``b`` and ``c = (a op b) mod p``, row-major in
    ``(a, b)``. ``div`` is ``a * b^(-1) mod p`` for ``b != 0`` only (Power et al.'s ``x / y``; ``p`` must be
    prime), so its table has ``p * (p - 1)`` rows; the others have ``p * p``."""
    a, b = (t.reshape(-1) for t in torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij"))
    if op == "add":
        c = (a + b) % p
    elif op == "sub":
        c = (a - b) % p
    elif op == "mul":
        c = (a * b) % p
    elif op == "div":
        keep = b != 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(v), -1, p) for v in range(1, p)])  # Fermat / extended Euclid
        c = (a * inverse[b - 1]) % p
    else:
        raise DatasetError(f"op must be one of {', '.join(map(repr, MODULAR_OPS))}, got {op!r}")
    return a, b, c


@register_dataset("modular")
def load_modular(p: int = 23, op: str = "add", train_fraction: float = 0.4, seed: int = 0,
                 sequence: str = "pair") -> Split:
    """Modular arithmetic ``c = (a op b) mod p`` as token sequences (Power et al. 2022, grokking).

    Tokens ``0 .. p-1`` are the numbers. ``sequence="pair"`` (default) gives inputs ``[a, b]``
    (``vocab_size = p``); ``sequence="equation"`` gives ``[a, OP, b, EQ]`` with ``OP = p`` and ``EQ = p + 1``
    (``vocab_size = p + 2``), Power et al.'s format, where the answer is the token after ``=``. Labels
    are ``c`` in ``[0, p)``: ``num_classes = p`` (a model pooling the last position reads ``b`` or ``=``).

    The table (``p * p`` equations; ``p * (p - 1)`` for ``div``) is shuffled by a private generator seeded
    with ``seed`` and its first ``round(train_fraction * size)`` equations are the training set, the rest
    the test (validation) set: disjoint, covering the table, and the same for the same arguments.
    Power et al. use ``p = 97`` and train fractions from about 0.3 to 0.5; ``p = 23`` (529 equations)
    keeps CPU runs to seconds.

    Raises:
        DatasetError: ``p < 2`` (or not prime for ``div``), unknown ``op`` / ``sequence``, a
            ``train_fraction`` leaving either part empty.
    """
    if not _is_int(p) or p < 2:
        raise DatasetError(f"p must be an integer >= 2, got {p!r}")
    if op == "div" and not _is_prime(p):
        raise DatasetError(f"op='div' needs a prime p (every b != 0 invertible mod p), got p={p}")
    if sequence not in ("pair", "equation"):
        raise DatasetError(f"sequence must be 'pair' ([a, b]) or 'equation' ([a, op, b, =]), got {sequence!r}")
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
            or not 0.0 < train_fraction < 1.0:
        raise DatasetError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    a, b, c = modular_table(p, op)
    size = len(c)
    num_train = round(train_fraction * size)
    if not 1 <= num_train < size:
        raise DatasetError(f"train_fraction={train_fraction} leaves an empty part of the {size} equations")
    if sequence == "pair":
        x, vocab = torch.stack([a, b], dim=1), p
    else:
        x, vocab = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1), p + 2
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    tr, te = order[:num_train], order[num_train:]
    return Split(x_train=x[tr].contiguous(), y_train=c[tr].contiguous(), x_test=x[te].contiguous(),
                 y_test=c[te].contiguous(), num_features=int(x.shape[1]), num_classes=p, name="modular",
                 input_shape=(int(x.shape[1]),), vocab_size=vocab)


def read_corpus(path: str | None = None) -> str:
    """The text of ``path`` (UTF-8), or of the bundled :data:`DEFAULT_CORPUS` when ``path`` is None.

    Raises:
        DatasetError: naming the file when it is missing or not UTF-8.
    """
    try:
        if path is None:
            return (resources.files("curvlab") / "data_files" / DEFAULT_CORPUS).read_text(encoding="utf-8")
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        where = f"the bundled corpus curvlab/data_files/{DEFAULT_CORPUS}" if path is None else repr(str(path))
        raise DatasetError(f"chars: {where} does not exist (pass data.path = a UTF-8 text file)") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"chars: {str(path)!r} is not UTF-8 text: {err}") from None


def char_vocabulary(train_text: str) -> str:
    """The characters of ``train_text``, sorted: character ``i`` is token ``i``; token ``len(vocab)`` is the
    unknown character (a test character never seen in training)."""
    return "".join(sorted(set(train_text)))


def _windows(ids: torch.Tensor, context: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``ids[s : s + context]`` and targets ``ids[s + 1 : s + context + 1]`` for ``s = 0, stride, ...``."""
    count = (len(ids) - context - 1) // stride + 1 if len(ids) > context else 0
    starts = torch.arange(count) * stride
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    win = ids[idx] if count else torch.zeros(0, context + 1, dtype=torch.int64)
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


@register_dataset("chars")
def load_chars(context: int = 32, test_fraction: float = 0.1, stride: int | None = None,
               max_chars: int | None = None, path: str | None = None) -> Split:
    """Character-level language modelling: predict the next character at every position.

    The text (``path``, UTF-8; default the bundled ``python_reference.txt``: 180 kB of prose from the
    Python documentation, PSF License v2, see ``curvlab/data_files/README``), cut to its first
    ``max_chars`` characters if given, is split BY POSITION: the first ``1 - test_fraction`` of it trains,
    the rest tests (no window crosses the boundary). The vocabulary is built from the training part
    (:func:`char_vocabulary`, sorted characters) plus one unknown token for test characters never seen in
    training: ``vocab_size = num_classes = len(vocab) + 1``. Examples are windows of ``context + 1``
    characters every ``stride`` characters (default ``context``: each character is a target once):
    inputs are the first ``context`` token ids, targets the last ``context`` (inputs shifted by one), so
    ``x`` and ``y`` are int64 ``(N, context)``.

    Raises:
        DatasetError: bad sizes, a missing / non-UTF-8 file, or a text too short for one window per part.
    """
    for name, value, low in (("context", context, 1), ("stride", stride, 1), ("max_chars", max_chars, 2)):
        if value is not None and (not _is_int(value) or value < low):
            raise DatasetError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    text = read_corpus(path)
    if max_chars is not None:
        text = text[:max_chars]
    cut = round((1.0 - test_fraction) * len(text))
    train_text, test_text = text[:cut], text[cut:]
    vocab = char_vocabulary(train_text)
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = len(vocab)

    def encode(part: str) -> torch.Tensor:
        return torch.tensor([index.get(ch, unknown) for ch in part], dtype=torch.int64)

    step = context if stride is None else stride
    x_tr, y_tr = _windows(encode(train_text), context, step)
    x_te, y_te = _windows(encode(test_text), context, step)
    if len(x_tr) == 0 or len(x_te) == 0:
        raise DatasetError(f"chars: {len(text)} characters split {len(train_text)}/{len(test_text)} give no "
                           f"window of {context + 1} characters in the {'train' if len(x_tr) == 0 else 'test'} "
                           "part; use a longer text, a larger max_chars or a smaller context")
    return Split(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_features=context,
                 num_classes=unknown + 1, name="chars", input_shape=(context,), vocab_size=unknown + 1)


def model_options_for(split: Split, builder: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The model builder's keyword arguments for ``split``: for a token data set (``vocab_size`` set), the
    builder's ``vocab_size`` is filled from the data when ``options`` leave it None, and a builder without a
    ``vocab_size`` argument (a model of float features) is refused with a ConfigError naming the remedy."""
    from .config import ConfigError

    if split.vocab_size is None:
        return options
    if "vocab_size" not in inspect.signature(builder).parameters:
        name = getattr(builder, "registry_name", getattr(builder, "__name__", "?"))
        raise ConfigError(f"data set {split.name!r} gives integer token ids (vocabulary {split.vocab_size}), but "
                          f"model {name!r} takes float features; use a token model such as 'transformer_lm'")
    if options.get("vocab_size") is None:
        return {**options, "vocab_size": split.vocab_size}
    return options
