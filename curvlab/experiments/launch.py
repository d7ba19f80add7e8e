"""Data-parallel runs: ``curvlab run`` under ``torchrun`` (or any launcher that sets the ``env://`` variables).

:func:`~curvlab.experiments.runner.run` calls :func:`setup` first. Without ``WORLD_SIZE > 1`` in the
environment (and no process group already initialized by the caller) it is a plain single-process run
and nothing here changes it. Under ``torchrun --nproc_per_node N -m curvlab run CONFIG`` (or a SLURM job
whose tasks export ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, e.g. through
``submitit.helpers.TorchDistributedEnvironment``) every process:

* joins the default process group (``gloo`` for ``train.device = "cpu"``, ``nccl`` for ``"cuda"``) and
  uses ``cuda:LOCAL_RANK`` (modulo the visible devices) as its device;
* draws the same batch order as a single-process run (same ``train.seed``) and trains on its contiguous
  share of every global batch (:func:`shard`): the global batch stays ``train.batch_size``, which must be
  divisible by the world size. The model is wrapped in ``DistributedDataParallel`` with a communication
  hook that weights each rank's mean gradient by ``n_rank / n_global`` before the sum (:func:`set_share`;
  DDP's own ``1 / world`` for every full batch), so the gradient is the mean over the global batch even
  for an unevenly split last batch, and the loss (hence what curvlab captures) is not rescaled. The
  curvature statistics are the optimizer's business (``curvlab.optimizer`` on a DDP-wrapped model reduces
  them across ranks, weighted by the local batch sizes: :mod:`curvlab.distributed`);
* evaluates its shard of the evaluation sets and all-reduces sums (:meth:`DistContext.all_sum`), so every
  rank holds the same metrics;
* writes nothing unless it is rank 0: rank 0 writes ``config.json``, ``metrics.jsonl``, checkpoints,
  ``summary.json`` and ``DONE``; all ranks read a checkpoint to resume (the run directory must be on a
  file system every rank sees, as usual for clusters).

The world size is not part of the run id: the same configuration run on 1 or N processes is the same
experiment and gives the same metrics up to floating-point reduction order (and MC sampling, whose
per-example draws depend on how the batch is split; and BatchNorm, which normalizes over each rank's
local batch: no SyncBatchNorm conversion). ``summary.json`` records ``world_size``. A checkpoint written
by N processes resumes on M (it holds the bare module's state and the optimizer's, identical on all ranks).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = ["DistContext", "setup", "env_world_size", "shard", "check_batch_size", "wrap_model", "set_share",
           "unwrap"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset): > 1 means a launcher started several processes."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (0 of 1 = not distributed), its device, and
    whether :func:`setup` created the process group (then :meth:`close` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64; the identity when not distributed)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def close(self, barrier: bool = True) -> None:
        """Destroy the process group if :func:`setup` created it, after a barrier (so rank 0 has written
        ``DONE`` before any rank returns) unless ``barrier=False`` (after an error: the other ranks may be
        inside a collective, and the launcher ends them when this process exits with the error)."""
        if self.owns_group and dist.is_initialized():
            try:
                if barrier:
                    self.barrier()
            finally:
                dist.destroy_process_group()
            self.owns_group = False


def _device(name: str, local_rank: int) -> torch.device:
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    if device.index is not None:  # an explicit index is the user's choice (one process per device needed)
        return device
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str) -> DistContext:
    """The :class:`DistContext` of this process for ``train.device = device``.

    Joins the default process group when ``WORLD_SIZE > 1`` (``env://`` rendezvous: ``torchrun`` sets
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); an already initialized
    group (the caller's) is used as it is and left open.

    Raises:
        ConfigError: CUDA requested but absent, or an incomplete launcher environment.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        ctx = DistContext(rank, world, local, _device(device, local), owns_group=False)
    else:
        world = env_world_size()
        if world <= 1:  # a plain run: the device exactly as configured
            return DistContext(device=torch.device(device))
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start distributed runs with "
                              "torchrun (e.g. torchrun --nproc_per_node 2 -m curvlab run CONFIG)")
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = _device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
        ctx = DistContext(rank, world, local, dev, owns_group=True)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    return ctx


def check_batch_size(batch: int, num_train: int, world: int) -> None:
    """Refuse a global batch the ranks cannot share: ``train.batch_size`` not divisible by the world size,
    or a last batch of the epoch with fewer examples than ranks (a rank would get no data)."""
    if world <= 1:
        return
    if batch % world:
        raise ConfigError(f"train.batch_size={batch} is the global batch and must be divisible by the world size "
                          f"{world} (each rank trains on batch_size / world examples); choose e.g. "
                          f"train.batch_size={max(world, batch - batch % world)}")
    last = num_train % batch
    if 0 < last < world:
        raise ConfigError(f"the last batch of each epoch has {last} example(s) ({num_train} % train.batch_size="
                          f"{batch}), fewer than the {world} ranks; choose another train.batch_size")


def shard(n: int, rank: int, world: int) -> slice:
    """The contiguous share of rank ``rank`` in a batch of ``n`` examples (sizes differ by at most one,
    larger shares first, as ``torch.tensor_split``)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


class _Share:
    """State of the gradient hook: this rank's weight ``n_rank / n_global`` in the current step."""

    def __init__(self, world: int) -> None:
        self.weight = 1.0 / world


def _weighted_mean_hook(share: _Share, bucket):  # noqa: ANN001,ANN201  (DDP checks the annotations: none
    # or the real types, which `from __future__ import annotations` turns into strings)
    """DDP communication hook: ``sum_r w_r g_r`` with ``w_r = n_r / n`` (the global-batch mean gradient of
    per-rank mean gradients ``g_r``; ``bucket``: a ``dist.GradBucket``, returns a ``torch.futures.Future``);
    with equal shares this is DDP's default ``sum_r g_r / world``."""
    buf = bucket.buffer()
    buf.mul_(share.weight)
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` with the weighted-mean gradient hook when distributed (it
    broadcasts rank 0's parameters, so every rank starts identical), else ``model``."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index or 0] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids)
    ddp._curvlab_share = _Share(ctx.world_size)
    ddp.register_comm_hook(ddp._curvlab_share, _weighted_mean_hook)
    return ddp


def set_share(model: torch.nn.Module, n_local: int, n_global: int) -> None:
    """Set this rank's gradient weight ``n_local / n_global`` for the next backward (a model from
    :func:`wrap_model`; no-op otherwise)."""
    share = getattr(model, "_curvlab_share", None)
    if share is not None:
        share.weight = n_local / n_global


def unwrap(model: torch.nn.Module) -> Any:
    """The module inside a ``DistributedDataParallel`` wrapper (checkpoints store its state, so they are
    the same for any world size)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
