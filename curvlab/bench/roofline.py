"""A roofline for ``curvlab bench``: how far each section of a step is from what the machine's BLAS allows.

For one schedule period of every benchmarked configuration, a :class:`ProductRecorder` (a
``TorchDispatchMode``) records every product the step performs -- GEMM, batched GEMM, matrix-vector,
convolution and the LAPACK factorizations and solves -- with its shapes, charged to the section open at the
time (:mod:`curvlab.profiling`: ``statistics``, ``refresh``, ``precondition``, ``rule``; products outside them,
in the model's forward and backward and the capture hooks, to ``forward_backward``). Then, in the same run and
with the same clock, each distinct product is replayed as a plain call on fresh contiguous tensors of the
same shapes and dtype (well-conditioned matrices for the factorizations). For every section this gives

* ``gmac``: multiply-adds per step (GEMM ``m k n``; Cholesky ``n^3/6``, its inverse ``n^3/3``, a triangular
  solve ``n^2 k/2``, a symmetric eigendecomposition with vectors ``4.5 n^3``, SVD ``m n^2 + 5.5 n^3``, QR
  ``m n^2 - n^3/3``: the usual LAPACK operation counts, Golub & Van Loan, Matrix Computations, 4th ed.);
* ``plain_ms``: the time the same products take as plain calls of the same shapes, per step;
* ``efficiency``: ``plain_ms / measured ms`` of the section (1.0 = the section runs at this machine's BLAS
  speed on its own shapes; memory traffic, copies and Python are what make it smaller);

and for the row the ``floor``: the ratio to SGD the arithmetic allows, ``1 + (plain time of the row's
products - plain time of SGD's products) / SGD's measured step time`` -- the step if every extra product ran
at plain-call speed and nothing else cost anything.
"""
from __future__ import annotations

import math
import statistics as st
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
FORWARD_BACKWARD = "forward_backward"


def _numel(shape) -> int:
    return math.prod(shape)


def _mm(a, b):                      # (..., m, k) @ (..., k, n): batch m k n
    return _numel(a) * b[-1]


def _sq(a) -> tuple[int, int]:       # batch count and order of a square (..., n, n) argument
    return _numel(a[:-2]), a[-1]


def _tri_solve(a, b):               # a (.., n, n), b (.., n, k)
    batch, n = _sq(a)
    return max(batch, _numel(b[:-2])) * n * n * b[-1] / 2


def _svd(a):
    m, n = max(a[-2:]), min(a[-2:])
    return _numel(a[:-2]) * (m * n * n + 5.5 * n ** 3)


def _conv_backward(grad, x, w, *rest, mask=(True, True, True)):
    per = _numel(grad) * _numel(w[1:])
    return per * (int(bool(mask[0])) + int(bool(mask[1])))


#: op -> (multiply-adds from the shapes of its tensor arguments, indices of the arguments that are matrices to
#: be replaced by well-conditioned ones on replay)
PRODUCTS: dict[Any, tuple[Callable[..., float], tuple[int, ...]]] = {
    aten.mm.default: (lambda a, b: _mm(a, b), ()),
    aten.mm.out: (lambda a, b, *_: _mm(a, b), ()),
    aten.addmm.default: (lambda c, a, b: _mm(a, b), ()),
    aten.addmm.out: (lambda c, a, b, *_: _mm(a, b), ()),
    aten.bmm.default: (lambda a, b: _mm(a, b), ()),
    aten.bmm.out: (lambda a, b, *_: _mm(a, b), ()),
    aten.addmm_.default: (lambda c, a, b: _mm(a, b), ()),
    aten.baddbmm.default: (lambda c, a, b: _mm(a, b), ()),
    aten.baddbmm_.default: (lambda c, a, b: _mm(a, b), ()),
    aten.addbmm_.default: (lambda c, a, b: _mm(a, b), ()),
    aten.addmv_.default: (lambda c, a, v: _numel(a), ()),
    aten.addbmm.default: (lambda c, a, b: _mm(a, b), ()),
    aten.mv.default: (lambda a, v: _numel(a), ()),
    aten.addmv.default: (lambda c, a, v: _numel(a), ()),
    aten.dot.default: (lambda a, b: _numel(a), ()),
    aten.vdot.default: (lambda a, b: _numel(a), ()),
    aten.convolution.default: (lambda x, w, *_: None, ()),          # needs the output shape: see _macs
    aten.convolution_backward.default: (_conv_backward, ()),
    aten.linalg_cholesky_ex.default: (lambda a: _sq(a)[0] * _sq(a)[1] ** 3 / 6, (0,)),
    aten.cholesky_inverse.default: (lambda a: _sq(a)[0] * _sq(a)[1] ** 3 / 3, (0,)),
    aten.cholesky_solve.default: (lambda b, a: 2 * _tri_solve(a, b), (1,)),
    aten.linalg_solve_triangular.default: (lambda a, b: _tri_solve(a, b), (0,)),
    aten.triangular_solve.default: (lambda b, a: _tri_solve(a, b), (1,)),
    aten._linalg_eigh.default: (lambda a: _sq(a)[0] * 4.5 * _sq(a)[1] ** 3, (0,)),
    aten.linalg_inv_ex.default: (lambda a: _sq(a)[0] * _sq(a)[1] ** 3, (0,)),
    aten.linalg_lu_factor_ex.default: (lambda a: _sq(a)[0] * _sq(a)[1] ** 3 / 3, (0,)),
    aten._linalg_svd.default: (lambda a: _svd(a), (0,)),
    aten.linalg_qr.default: (lambda a: _numel(a[:-2]) * (a[-2] * a[-1] ** 2 - min(a[-2:]) ** 3 / 3), ()),
}


def _shapes(args) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]


class ProductRecorder(TorchDispatchMode):
    """Counts every product of :data:`PRODUCTS` dispatched while active, by ``(section, signature)``.

    ``where()`` names the section to charge (``None``: :data:`FORWARD_BACKWARD`). A signature is the op with
    its arguments, tensors replaced by ``(shape, dtype, device)``, so that it can be replayed."""

    def __init__(self, where: Callable[[], str | None]) -> None:
        super().__init__()
        self.where = where
        self.counts: Counter = Counter()
        self.macs: dict[tuple, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in PRODUCTS:
            sig = (func, _describe(args), _describe(tuple(sorted(kwargs.items()))))
            if sig not in self.macs:
                self.macs[sig] = _macs(func, args, kwargs, out)
            self.counts[(self.where() or FORWARD_BACKWARD, sig)] += 1
        return out


def _describe(obj):
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, str(obj.device))
    if isinstance(obj, (list, tuple)):
        return tuple(_describe(o) for o in obj)
    return obj


def _macs(func, args, kwargs, out) -> float:
    if func is aten.convolution.default:
        x, w = args[0], args[1]
        return float(out.numel() * _numel(w.shape[1:]))
    count, _ = PRODUCTS[func]
    if func is aten.convolution_backward.default:
        return float(count(*_shapes(args[:3]), mask=args[-1]))
    return float(count(*_shapes(args)))


def _materialize(desc, conditioned: bool = False):
    """Fresh tensors for a described argument list (random; ``conditioned``: diagonally dominant SPD)."""
    if isinstance(desc, tuple) and desc and desc[0] == "tensor":
        _, shape, dtype, device = desc
        if not dtype.is_floating_point:
            return torch.zeros(shape, dtype=dtype, device=device)
        t = torch.randn(shape, dtype=dtype, device=device)
        if conditioned and len(shape) >= 2 and shape[-1] == shape[-2]:
            t = 0.5 * (t + t.transpose(-1, -2)) / math.sqrt(shape[-1])
            t.diagonal(dim1=-2, dim2=-1).add_(4.0)
        return t
    if isinstance(desc, tuple):
        return tuple(_materialize(d) for d in desc)
    return desc


def replay_seconds(sig: tuple, clock: Callable[[], float], sync: Callable[[], None] | None = None,
                   rounds: int = 3, min_seconds: float = 2e-3) -> float:
    """Seconds of one plain call of the product ``sig`` on fresh contiguous tensors (median of ``rounds``)."""
    func, args_desc, kwargs_desc = sig
    _, special = PRODUCTS[func]
    args = [_materialize(d, conditioned=i in special) for i, d in enumerate(args_desc)]
    kwargs = {k: _materialize(v) for k, v in kwargs_desc}

    def run(k: int) -> float:
        if sync is not None:
            sync()
        start = clock()
        for _ in range(k):
            func(*args, **kwargs)
        if sync is not None:
            sync()
        return clock() - start

    once = run(1)                                                   # warm-up (allocation, dispatch caches)
    once = max(run(1), 1e-7)
    k = max(1, min(1000, math.ceil(min_seconds / once)))
    return st.median(run(k) / k for _ in range(rounds))


def roofline(steps: dict[str, Any], periods: dict[str, int], rows: list[dict[str, Any]], *,
             clock: Callable[[], float], sync: Callable[[], None] | None = None,
             after_block: Callable[[str], None] | None = None, reference: str = "sgd") -> None:
    """Record one period of every step (``steps[label]()``; the optimizer's ``sections`` say where), replay
    the distinct products and add ``row["roofline"]`` to every row (module doc). ``rows`` carry the measured
    ``breakdown_ms`` and ``step_ms``; ``reference`` names the row whose measured step is the floor's unit."""
    recorded: dict[str, ProductRecorder] = {}
    for label, step in steps.items():
        sections = getattr(step.opt, "sections", None)
        rec = ProductRecorder(lambda s=sections: getattr(s, "current", None))
        with rec:
            for _ in range(periods[label]):
                step()
        if after_block is not None:
            after_block(label)
        recorded[label] = rec
    times: dict[tuple, float] = {}
    for rec in recorded.values():
        for _, sig in rec.counts:
            if sig not in times:
                times[sig] = replay_seconds(sig, clock, sync)
    plain_total = {}
    by_label = {r["label"]: r for r in rows}
    for label, rec in recorded.items():
        per_step = periods[label]
        sections: dict[str, dict[str, float]] = {}
        for (where, sig), n in rec.counts.items():
            s = sections.setdefault(where, {"gmac": 0.0, "plain_ms": 0.0})
            s["gmac"] += n * rec.macs[sig] / 1e9 / per_step
            s["plain_ms"] += n * times[sig] * 1e3 / per_step
        measured = by_label[label]["breakdown_ms"]
        for where, s in sections.items():
            ms = measured.get(where, 0.0)
            s["ms"] = ms
            s["efficiency"] = s["plain_ms"] / ms if ms > 0 else None
        plain_total[label] = sum(s["plain_ms"] for s in sections.values())
        by_label[label]["roofline"] = {"sections": sections, "gmac": sum(s["gmac"] for s in sections.values()),
                                       "plain_ms": plain_total[label]}
    ref = by_label[reference]
    for label, row in by_label.items():
        if label in plain_total:
            extra = plain_total[label] - plain_total[reference]
            row["roofline"]["floor"] = 1.0 + max(extra, 0.0) / ref["step_ms"]


def format_roofline(rows: list[dict[str, Any]], order=("forward_backward", "statistics", "refresh",
                                                        "precondition", "rule")) -> str:
    """One line per row: the ratio, its floor, and per section ``GMAC/step  ms  plain ms  efficiency``."""
    head = f"{'configuration':<58} {'ratio':>6} {'floor':>6}  " + "  ".join(
        f"{name[:16]:>27}" for name in order)
    sub = f"{'':<58} {'':>6} {'':>6}  " + "  ".join(f"{'GMAC':>6} {'ms':>6} {'plain':>6} {'eff':>5}" for _ in order)
    lines = [head, sub, "-" * len(head)]
    for r in rows:
        roof = r.get("roofline")
        if roof is None:
            continue
        cells = []
        for name in order:
            s = roof["sections"].get(name)
            if s is None:
                cells.append(f"{'':>27}")
                continue
            eff = "" if s["efficiency"] is None else f"{100 * s['efficiency']:.0f}%"
            cells.append(f"{s['gmac']:>6.3f} {s['ms']:>6.2f} {s['plain_ms']:>6.2f} {eff:>5}")
        lines.append(f"{r['label'][:58]:<58} {r['ratio']:>6.2f} {roof['floor']:>6.2f}  " + "  ".join(cells))
    return "\n".join(lines)
