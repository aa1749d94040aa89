"""Scale-out with ``torchrun``: process-group set-up, batches split across ranks, sharded scoring.

``torchrun --nproc_per_node=N -m twostage_ad.pipeline run ...`` starts N processes; each reads
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` and joins one process group (gloo on the CPU, nccl on
CUDA). Training wraps both networks of a stage in ``DistributedDataParallel``; every rank
draws the *same* global batch order and takes its own contiguous slice of each global batch, so
N processes apply the same updates as one process would (within floating-point tolerance) when
every loss term is a mean over the global batch. Three places need care for that:

- BatchNorm in stage 2's generator: its batch statistics must be global — ``SyncBatchNorm`` on
  CUDA, :class:`GlobalBatchNorm2d` (the same maths with an autograd all-reduce) on the CPU,
  where ``SyncBatchNorm`` refuses to run (docs/design.md §8).
- Means over a subset of rows (stage 1's clean / defect rows) and batch means inside a loss
  (stage 1's feature matching): :meth:`DistributedContext.sum` with autograd makes them global.
- Synthetic defects: drawn per image from ``(seed, epoch, index)``, so which rank draws an image
  does not change it.

Scoring is sharded by index (contiguous slices, no padding: ``DistributedSampler`` repeats
samples, which would double-count in AUROC) and gathered on every rank; rank 0 alone writes.
"""

from __future__ import annotations

import gc
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "DistributedContext",
    "init_distributed",
    "shutdown_distributed",
    "GlobalBatchSampler",
    "GlobalBatchNorm2d",
    "convert_batchnorm",
    "restore_batchnorm",
    "wrap_ddp",
    "unwrap",
]

log = logging.getLogger(__name__)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a gradient: d(Σ_r x_r)/dx_r = 1, so each rank's gradient is the sum of
    the upstream gradients of every rank (each rank's loss uses the same global sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` (1 = a plain single-process run)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (sizes differ by at most one; no padding)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def sum(self, tensor: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (itself when single-process); ``differentiable`` keeps the graph."""
        if not self.enabled:
            return tensor
        if differentiable:
            return _SumOverRanks.apply(tensor)
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Average per-rank scalars (loss values for the log) over ranks, in one collective."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        total = self.sum(torch.tensor([values[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, total.tolist())}

    def gather(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every rank's shard (in rank order) on every rank."""
        if not self.enabled:
            return array
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, array)
        return np.concatenate(parts)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_parameters(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers in ``module`` on every rank (after re-initialising it)."""
        if self.enabled:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def run_on_main(self, function: Callable[[], Any]) -> Any:
        """``function()`` on rank 0, its result on every rank; when it raises, every rank raises it.

        For rank-0-only work that can fail (creating the run folder): the other ranks would
        otherwise wait for rank 0 forever.
        """
        if not self.enabled:
            return function()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", function())
            except Exception as error:  # re-raised on every rank below
                outcome = ("error", error)
        status, value = self.broadcast(outcome)
        if status == "error":
            raise value
        return value


def init_distributed(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group ``torchrun`` describes in the environment; a no-op without it.

    Returns the context and this rank's device (``cuda:LOCAL_RANK`` when ``device`` is CUDA).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # nccl for CUDA tensors, gloo for the small CPU tensors and objects (losses for the log, gathers)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    if dist.get_world_size() != world_size:
        raise RuntimeError(f"WORLD_SIZE is {world_size} but the process group has {dist.get_world_size()} ranks")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank), device


def shutdown_distributed(*, barrier: bool = False) -> None:
    """Leave the process group ``init_distributed`` joined (a no-op without one).

    A process that exits with the group still alive leaves gloo's threads to the interpreter's
    teardown, which can abort it ("terminate called without an active exception": a 2-process test
    failed that way in about one run in ten, also with an unsynchronised ``destroy_process_group``).
    Callers synchronise where the ranks are in step (``run_pipeline`` does before rank 0 writes the
    run folder; ``barrier=True`` here when all ranks arrive together), so that no rank closes its
    connections while another is still in a collective; never after an error, when the others may
    not arrive. A garbage collection first, so that no DDP wrapper left in a reference cycle keeps
    the group alive past it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


class GlobalBatchSampler(Sampler):
    """Batches of a shuffled epoch, identical on every rank; yields this rank's slice of each.

    ``batch_size`` is the *global* batch (all ranks together) and must be divisible by the world
    size. The order comes from ``generator`` (same seed everywhere), so one process and N
    processes see the same global batches. Items are ``(epoch, index)`` when ``with_epoch`` (for
    datasets whose augmentation is seeded per epoch and image), else plain indices. Only full
    batches are used. The sampler counts epochs itself: one pass = one epoch (``start_epoch``
    when resuming; a training capped at a number of steps stops part-way through its last pass).
    """

    def __init__(
        self, n: int, batch_size: int, generator: torch.Generator, context: DistributedContext, *,
        with_epoch: bool = False, start_epoch: int = 1,
    ):
        if not 0 < batch_size <= n:
            raise ValueError(f"batch_size must be in 1..{n} (the number of images), got {batch_size}")
        if batch_size % context.world_size:
            raise ValueError(
                f"the global batch size {batch_size} is not divisible by the {context.world_size} processes; "
                "choose a batch size that is a multiple of --nproc_per_node"
            )
        self.n, self.batch_size, self.generator, self.context = n, batch_size, generator, context
        self.with_epoch, self.epoch = with_epoch, start_epoch

    def __len__(self) -> int:
        return self.n // self.batch_size  # full batches only (BatchNorm, equal shards)

    def __iter__(self) -> Iterator[list[Any]]:
        order = torch.randperm(self.n, generator=self.generator).tolist()
        epoch, self.epoch = self.epoch, self.epoch + 1
        per_rank = self.batch_size // self.context.world_size
        first = self.context.rank * per_rank
        for b in range(len(self)):
            mine = order[b * self.batch_size + first : b * self.batch_size + first + per_rank]
            yield [(epoch, i) for i in mine] if self.with_epoch else mine


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are over the global batch of all ranks.

    The CPU counterpart of ``torch.nn.SyncBatchNorm`` (which runs on GPUs only): per-rank sums of
    ``x`` and ``x²`` are all-reduced with autograd, so the gradient also flows through the global
    mean and variance. Eval mode and single-process training are plain ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dtype = x.dtype
        x = x.float()  # statistics in float32 also under bf16 autocast, as BatchNorm2d keeps them
        n = float(x.numel() // x.shape[1]) * dist.get_world_size()  # equal shards (GlobalBatchSampler)
        mean = _SumOverRanks.apply(x.sum(dim=(0, 2, 3))) / n
        centred = x - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum(dim=(0, 2, 3))) / n  # two passes: no E[x²] − E[x]² cancellation
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / max(n - 1, 1.0))
        out = centred * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Global batch statistics for every BatchNorm: ``SyncBatchNorm`` on CUDA, else :class:`GlobalBatchNorm2d`.

    Converted in place (same parameters and buffers, same state-dict keys).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for sub in module.modules():
        if type(sub) is nn.BatchNorm2d:
            sub.__class__ = GlobalBatchNorm2d
    return module


def restore_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_batchnorm` on the CPU (plain ``BatchNorm2d`` again); CUDA's SyncBatchNorm stays."""
    for sub in module.modules():
        if type(sub) is GlobalBatchNorm2d:
            sub.__class__ = nn.BatchNorm2d
    return module


def wrap_ddp(module: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` itself."""
    if not context.enabled:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # buffers need no syncing: BatchNorm statistics are global, hence equal on every rank
    ddp = nn.parallel.DistributedDataParallel
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters else {
        "broadcast_buffers": False}  # torch before forward_sync_buffers
    return ddp(module, device_ids=ids, **no_sync)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the network itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
