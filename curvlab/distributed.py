"""Data-parallel training on ``torch.distributed`` (DESIGN.md "Scale-out"; ALGORITHMS.md 2.2, 4.6, 7.1).

:class:`DataParallel` is built by the optimizer from its model and two options (:mod:`curvlab.hyper`):

* ``data_parallel``: ``"auto"`` (default) is on for a ``DistributedDataParallel`` model and for a raw model
  while a process group of more than one rank is initialized, off otherwise (a no-op: zero overhead);
  ``True`` requires a process group; ``False`` keeps every rank on its own (refused for a DDP model, whose
  replicas would then diverge). A DDP wrapper is unwrapped (``model.module``), so layer names and
  checkpoints are those of the raw model. With a raw model curvlab averages the gradients itself, ONE
  all-reduce over one flat buffer per dtype at the start of ``step`` (DDP's convention: mean over ranks).
* ``data_parallel_refresh``: ``"replicated"`` (default: every rank refreshes every layer; no refresh
  traffic, nothing waits on another rank) or ``"distributed"`` (the KAISA idea, Pauloski et al. SC 2021:
  each layer has ONE owner rank, chosen greedily by estimated refresh cost, largest first, to the least
  loaded rank; the owner refreshes and sends the result to all in one flat buffer per owner). What a refresh
  produces is named by the curvature's class attribute ``refreshed`` (attribute names; ``()``: nothing, no
  traffic); without it the whole ``state_dict`` is sent. The cost estimate is ``refresh_cost()`` if the
  curvature defines it, else computed from the shapes of its state (:func:`refresh_cost`).

Statistics (``Curvature.statistics``) are reduced on statistics steps in ONE bucketed all-reduce per dtype,
each entry by the reduction its curvature declares in the class attribute ``reductions`` (key -> kind;
looked up by the key, then the key without trailing digits, then ``"*"``; default ``"mean"``):

* ``"mean"``: the statistic is a mean over the local examples (K-FAC's ``A``, ``G``; Fisher blocks). Each
  rank contributes ``n_r * S_r`` and the sum is divided by ``sum_r n_r``: the mean over the concatenated
  batch, exactly, also for unequal local batch sizes ``n_r`` (``LayerStats.batch_size``);
* ``"mean_sym"``: the same for symmetric matrices (last two dimensions): only the upper triangle is sent,
  about half the volume, and the result is exactly symmetric;
* ``"cat"``: per-example rows (EKFAC's per-example gradients): concatenated along dim 0 in rank order;
* ``"cat_rms"``: rows that carry ``1/sqrt(n_r)`` so that ``X^T X`` is a mean (ISAAC's ``X``, MBF-Woodbury's
  ``a``): concatenated and rescaled to ``1/sqrt(sum_r n_r)``;
* ``"none"``: already global or identical on every rank (Shampoo's statistics come from the averaged
  gradient; scalar weights).

A gather writes each rank's rows into its slot of the shared buffer (an all-reduce of a zero-padded
concatenation: ``2(P-1)/P`` times the gathered size on a ring, twice an all-gather, but everything stays in one
bucket). The slots come from a small header all-reduce of every rank's row counts (``P x K`` int64), so local
batch sizes may differ; estimators with gathered statistics issue two collectives per statistics step (header,
bucket), mean-only estimators one. A float32 and a float64 layer in one model give one bucket per dtype.

FOP (ALGORITHMS.md 2.2): the even ranks are the first sub-batch, the odd ranks the second; each rank
computes its LOCAL mean gradient from the captured rows (before any all-reduce), and one all-reduce over
``[is_even n_r g_r, is_odd n_r g_r, is_even n_r, is_odd n_r]`` gives both sub-batch means. With two ranks
each holding half of the batch this is the single-process split into first / second half.

After a step every rank holds the same optimizer state, so the ``state_dict`` of any rank is a checkpoint
for ANY world size (names are the raw model's). The Monte-Carlo Fisher draws labels from a per-rank
generator (seed ``seed + 7919 rank``): it equals the single-process run in distribution, not sample for
sample. ``NumericsEvent``\\ s of a distributed refresh are recorded on the owner rank only.

``step``, ``update_curvature`` and ``refresh`` are collectives when active: every rank calls them together.
Gradients follow DDP (mean over ranks); with unequal local batches that is not the mean over examples, while
the statistics are example-weighted.

Volume per step and rank (bytes handed to the collectives; ``comm`` counts them per kind: ``"gradients"``,
``"statistics"``, ``"fop"``, ``"refresh"``; a ring all-reduce moves about ``2(P-1)/P`` times that):

* gradients: the model's gradient size, by DDP (or by curvlab for a raw model), every step;
* statistics, on statistics steps: K-FAC ``sum_l (d_in+1)^2 + d_out^2`` numbers (MLP 784-512-512-10 in
  float32: 6.67 MB, 2.5x its 2.68 MB of gradients); MBF the blocks; ISAAC / EKFAC / MBF-Woodbury their gathered
  rows (``P n_r x width``) plus the header; Shampoo and identity nothing;
* refresh, on refresh steps: ``"replicated"`` nothing; ``"distributed"`` the refreshed state of every layer
  (K-FAC: the damped inverses, as large as the factors), each rank sending its own layers and receiving the rest;
* FOP: twice the preconditioned layers' gradient size, every step, on top of the gradient all-reduce.
"""
from __future__ import annotations

import io
import math
import time
from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .stats import LayerStats
from .units import Unit

REDUCTIONS = ("mean", "mean_sym", "cat", "cat_rms", "none")
_MEANS = ("mean", "mean_sym")


def reduction_of(curvature: Any, key: str) -> str:
    """The declared reduction of statistic ``key`` (exact key, key without trailing digits, ``"*"``, "mean")."""
    table = getattr(curvature, "reductions", None) or {}
    kind = table.get(key, table.get(key.rstrip("0123456789"), table.get("*", "mean")))
    if kind not in REDUCTIONS:
        raise ValueError(f"{type(curvature).__name__}.reductions[{key!r}] = {kind!r}; must be one of {REDUCTIONS}")
    return kind


def refresh_cost(curvature: Any) -> float:
    """Estimated flops of one refresh: ``curvature.refresh_cost()`` if defined, else from the state's tensors
    (a batch of ``r x c`` matrices costs ``batch (min^3 + r c min)``, a vector its length)."""
    if callable(getattr(curvature, "refresh_cost", None)):
        return float(curvature.refresh_cost())
    total = 0.0
    stack: list[Any] = [curvature.state_dict()]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.dim() >= 2:
                r, c = obj.shape[-2:]
                m = min(r, c)
                total += obj.numel() / (r * c) * (m ** 3 + r * c * m)
            else:
                total += obj.numel()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def _tri(m: int) -> int:
    return m * (m + 1) // 2


def _triu(t: torch.Tensor) -> torch.Tensor:
    """Upper triangles (row-major) of the square matrices in the last two dims, ``(..., m(m+1)/2)``."""
    iu = torch.triu_indices(t.shape[-1], t.shape[-1], device=t.device)
    return t[..., iu[0], iu[1]]


def _untriu(flat: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The symmetric matrices of ``shape`` whose upper triangles are ``flat``."""
    m = shape[-1]
    iu = torch.triu_indices(m, m, device=flat.device)
    vals = flat.view(*shape[:-2], _tri(m))
    out = flat.new_empty(shape)
    out[..., iu[0], iu[1]] = vals
    out[..., iu[1], iu[0]] = vals
    return out


def _pack(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _unpack(data: torch.Tensor, device: torch.device) -> Any:
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True, map_location=device)


class DataParallel:
    """The data-parallel context of one optimizer (see the module doc). Inactive: every method is a no-op."""

    def __init__(self, model: nn.Module, config: dict[str, Any]) -> None:
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.module: nn.Module = model.module if ddp else model
        self.ddp = ddp
        self.strategy: str = config.get("data_parallel_refresh", "replicated")
        mode = config.get("data_parallel", "auto")
        ready = dist.is_available() and dist.is_initialized()
        if mode is False and ddp:
            raise ValueError("data_parallel=False with a DistributedDataParallel model would let the replicas' "
                             "curvature (and then their weights) diverge; use data_parallel='auto'")
        if mode is True and not ready:
            raise ValueError("data_parallel=True needs torch.distributed.init_process_group(...) before the "
                             "optimizer is built; or use data_parallel='auto'")
        self.group = (model.process_group if ddp else None) if ready else None
        self.world = dist.get_world_size(self.group) if ready else 1
        self.rank = dist.get_rank(self.group) if ready else 0
        self.active = bool(ready and mode is not False and (mode is True or ddp or self.world > 1))
        #: where the collectives' own tensors live (the parameters' device: NCCL needs CUDA tensors)
        self.device = next(iter(self.module.parameters()), torch.empty(0)).device
        self.units: list[Unit] = []
        self.owners: dict[str, int] | None = None
        #: per kind: collectives issued, bytes handed to them, wall seconds spent in them (waiting included)
        self.comm: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "bytes": 0, "seconds": 0.0})

    # -- plumbing ----------------------------------------------------------------------------------------
    def bind(self, units: list[Unit]) -> None:
        """Take the optimizer's units; refuse curvatures that declare ``data_parallel_refusal`` (a message)."""
        self.units = [u for u in units if u.preconditioned]
        self.owners = None
        if self.active:
            for u in self.units:
                if why := getattr(u.curvature, "data_parallel_refusal", None):
                    raise ValueError(f"layer {u.name!r} cannot train data-parallel: {why}")

    def seed(self, seed: int) -> int:
        """Per-rank seed of the Monte-Carlo label generator."""
        return seed + 7919 * self.rank if self.active else seed

    def _count(self, kind: str, buf: torch.Tensor) -> None:
        self.comm[kind]["calls"] += 1
        self.comm[kind]["bytes"] += buf.numel() * buf.element_size()

    def _all_reduce(self, buf: torch.Tensor, kind: str) -> None:
        self._count(kind, buf)
        t0 = time.perf_counter()
        dist.all_reduce(buf, group=self.group)
        self.comm[kind]["seconds"] += time.perf_counter() - t0

    def _broadcast(self, buf: torch.Tensor, src: int, kind: str) -> None:
        self._count(kind, buf)
        group_src = src if self.group is None else dist.get_global_rank(self.group, src)
        t0 = time.perf_counter()
        dist.broadcast(buf, src=group_src, group=self.group)
        self.comm[kind]["seconds"] += time.perf_counter() - t0

    def reset_counters(self) -> None:
        self.comm.clear()

    # -- gradients (raw model only; DDP has averaged them during backward) ------------------------------------
    def reduce_gradients(self, units: Iterable[Unit]) -> None:
        """Average ``p.grad`` over the ranks: one all-reduce of one flat buffer per dtype (+ presence flags)."""
        if not self.active or self.ddp:
            return
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = defaultdict(list)
        for unit in units:
            for p in unit.params:
                by_dtype[p.dtype].append(p)
        for dtype, params in by_dtype.items():
            flat = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
            flags = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=params[0].device)
            buf = torch.cat(flat + [flags])
            self._all_reduce(buf, "gradients")
            buf /= self.world
            offset = 0
            for p, flag in zip(params, buf[-len(params):].tolist()):
                g = buf[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if p.grad is not None:
                    p.grad.copy_(g)
                elif flag > 0:
                    p.grad = g.clone()

    # -- statistics --------------------------------------------------------------------------------------------
    def reduce_statistics(self, new: dict[str, dict[str, torch.Tensor]], stats: dict[str, LayerStats],
                          curvatures: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        """This step's statistics of every layer reduced over the ranks (module doc): one all-reduce per dtype
        (plus one header exchange when some statistic is gathered)."""
        if not self.active or not new:
            return new
        entries: dict[torch.dtype, list[tuple[str, str, str, torch.Tensor]]] = defaultdict(list)
        for name, stat in new.items():
            for key, t in stat.items():
                kind = reduction_of(curvatures[name], key)
                if kind in ("cat", "cat_rms") and t.dim() == 0:
                    raise ValueError(f"layer {name!r}: statistic {key!r} is a scalar and cannot be gathered ({kind})")
                if kind == "mean_sym" and (t.dim() < 2 or t.shape[-1] != t.shape[-2]):
                    raise ValueError(f"layer {name!r}: statistic {key!r} of shape {tuple(t.shape)} is declared "
                                     "'mean_sym' but is not a (batch of) square matrices")
                if kind != "none":
                    entries[t.dtype].append((name, key, kind, t))
        out = {name: dict(stat) for name, stat in new.items()}
        names = list(new)
        gathered = [(name, key) for items in entries.values() for name, key, kind, _ in items if kind not in _MEANS]
        rows: dict[tuple[str, str], list[int]] = {}
        if gathered:    # per-rank row counts of the gathered entries: a small header exchange (int64, P x K)
            header = torch.zeros(self.world, len(gathered), dtype=torch.int64, device=self.device)
            header[self.rank] = torch.tensor([new[n][k].shape[0] for n, k in gathered], dtype=torch.int64)
            self._all_reduce(header, "statistics")
            rows = {nk: header[:, j].tolist() for j, nk in enumerate(gathered)}
        for dtype, items in entries.items():
            device = items[0][3].device
            local_n = [float(stats[n].batch_size) if n in stats else 0.0 for n in names]
            weight = {n: (c if c > 0 else 1.0) for n, c in zip(names, local_n)}
            parts = [torch.tensor([weight[n] for n in names], dtype=dtype, device=device)]
            for name, key, kind, t in items:
                if kind in _MEANS:
                    parts.append((_triu(t) if kind == "mean_sym" else t).reshape(-1) * weight[name])
                    continue
                counts, width = rows[(name, key)], t[0].numel()
                padded = t.new_zeros(sum(counts) * width)
                start = sum(counts[:self.rank]) * width
                padded[start:start + t.numel()] = t.reshape(-1) * (math.sqrt(weight[name]) if kind == "cat_rms" else 1.0)
                parts.append(padded)
            buf = torch.cat(parts)
            self._all_reduce(buf, "statistics")
            totals = dict(zip(names, buf[:len(names)].tolist()))
            offset = len(names)
            for name, key, kind, t in items:
                if kind in _MEANS:
                    size = t.numel() if kind == "mean" else t.numel() // t.shape[-1] ** 2 * _tri(t.shape[-1])
                    flat = buf[offset:offset + size] / totals[name]
                    out[name][key] = flat.view_as(t) if kind == "mean" else _untriu(flat, t.shape)
                    offset += size
                    continue
                total_rows = sum(rows[(name, key)])
                value = buf[offset:offset + total_rows * t[0].numel()].view(total_rows, *t.shape[1:])
                offset += value.numel()
                out[name][key] = value / math.sqrt(totals[name]) if kind == "cat_rms" else value.clone()
        return out

    # -- FOP's two sub-batches -----------------------------------------------------------------------------
    def fop_halves(self, units: list[Unit], stats: dict[str, LayerStats]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """``{layer: (g1, g2)}``: mean gradients of the even ranks' and the odd ranks' examples (matrix view),
        from each rank's LOCAL captured rows, in one all-reduce; ``None`` when fewer than two ranks."""
        if not self.active or self.world < 2:
            return None
        todo = [u for u in units if u.preconditioned and u.name in stats]
        if not todo:
            return {}
        even = self.rank % 2 == 0
        local, parts = [], []
        for unit in todo:
            s = stats[unit.name]
            (g, _), = s.output_rows("real")
            a = s.input_rows()
            m = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])        # sum_n g_n abar_n^T
            local.append(m)
            parts += [m.reshape(-1) if even else torch.zeros_like(m).reshape(-1),
                      torch.zeros_like(m).reshape(-1) if even else m.reshape(-1)]
        n = float(stats[todo[0].name].input_rows().shape[0])            # local examples
        ref = local[0]
        parts.append(ref.new_tensor([n if even else 0.0, 0.0 if even else n]))
        buf = torch.cat([p.to(ref.dtype) for p in parts])
        self._all_reduce(buf, "fop")
        n1, n2 = buf[-2:].tolist()
        out, offset = {}, 0
        for unit, m in zip(todo, local):
            k = m.numel()
            out[unit.name] = (buf[offset:offset + k].view_as(m) / n1, buf[offset + k:offset + 2 * k].view_as(m) / n2)
            offset += 2 * k
        return out

    # -- refreshes ------------------------------------------------------------------------------------------
    def _assign(self) -> dict[str, int]:
        """Greedy owners: largest estimated refresh cost first, each to the least loaded rank (ties: lowest)."""
        costs = sorted(((refresh_cost(u.curvature), i, u.name) for i, u in enumerate(self.units)),
                       key=lambda c: (-c[0], c[1]))
        load = [0.0] * self.world
        owners = {}
        for cost, _, name in costs:
            r = min(range(self.world), key=lambda k: (load[k], k))
            owners[name] = r
            load[r] += cost
        return owners

    def owned(self, todo: list[Unit]) -> list[Unit]:
        """The units of ``todo`` this rank refreshes itself (its own, and those whose refresh is empty)."""
        if not self.active or self.strategy == "replicated" or not todo:
            return todo
        if self.owners is None or any(u.name not in self.owners for u in todo):
            self.owners = self._assign()
        return [u for u in todo if not _shared(u.curvature) or self.owners[u.name] == self.rank]

    def share(self, todo: list[Unit]) -> None:
        """Send every owner's refreshed state to the others: one size all-reduce, one broadcast per owner."""
        if not self.active or self.strategy == "replicated" or not todo:
            return
        todo = [u for u in todo if _shared(u.curvature)]
        if not todo:
            return
        mine = {u.name: _refreshed(u.curvature) for u in todo if self.owners[u.name] == self.rank}
        payload = (_pack(mine) if mine else torch.zeros(0, dtype=torch.uint8)).to(self.device)
        sizes = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        sizes[self.rank] = payload.numel()
        self._all_reduce(sizes, "refresh")
        by_name = {u.name: u for u in todo}
        for src, size in enumerate(sizes.tolist()):
            if size == 0:
                continue
            buf = payload if src == self.rank else torch.empty(size, dtype=torch.uint8, device=self.device)
            self._broadcast(buf, src, "refresh")
            if src != self.rank:
                for name, state in _unpack(buf, self.device).items():
                    _restore(by_name[name].curvature, state)


def _shared(curvature: Any) -> bool:
    """False for a curvature whose refresh produces nothing (``refreshed = ()``): every rank runs it locally."""
    return getattr(curvature, "refreshed", None) != ()


def _refreshed(curvature: Any) -> Any:
    """What ``refresh`` produced: the attributes named in ``curvature.refreshed``, else its whole state_dict."""
    attrs = getattr(curvature, "refreshed", None)
    return {a: getattr(curvature, a) for a in attrs} if attrs else curvature.state_dict()


def _restore(curvature: Any, state: Any) -> None:
    if getattr(curvature, "refreshed", None):
        for a, v in state.items():
            setattr(curvature, a, v)
    else:
        curvature.load_state_dict(state)
