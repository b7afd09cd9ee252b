"""Data-parallel training across processes with PyTorch's own engine (DDP), for any
trainer of this package.

Start the script with ``torchrun --nproc-per-node N script.py ...``: torchrun sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` for each
process. :func:`init_from_env` reads them and joins the process group (NCCL for CUDA
devices, gloo on the CPU); without them it is a no-op and everything here behaves as a
single process (rank 0 of 1), so a trainer needs no separate code path.

How a trainer uses it:

* ``info = init_from_env(device)``; ``device = info.device`` (``cuda:LOCAL_RANK`` on GPUs);
* the global batch of a step is numbered ``0 .. world_size * per_rank - 1`` and rank ``r``
  draws the samples ``shard(per_rank, info)`` of it, each sample's randomness a function
  of ``(seed, step, global index)``: every rank sees different data and the union over the
  ranks is exactly the batch a single process with ``world_size * per_rank`` would see;
* ``ddp = wrap(model, info)`` averages the gradients over the ranks in ``backward()``
  (``no_sync(ddp, ...)`` skips the exchange on gradient-accumulation micro-batches);
  every rank then takes the same optimiser step, so the weights stay identical;
* ``info.is_main`` decides who validates, writes samples and saves (rank 0);
  ``mean_over_ranks(x)`` gives every rank the average of a logged number;
  ``barrier()`` waits for all ranks; ``shutdown()`` leaves the group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None          # None: a single process, no process group
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()


def env_ranks(environ=None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise InputError(f"torchrun's RANK / WORLD_SIZE / LOCAL_RANK are not integers ({e}).") from None
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"Invalid distributed environment: RANK={rank}, WORLD_SIZE={world}.")
    return rank, world, local


def init_from_env(device: torch.device | str = "cpu", *, backend: str | None = None,
                  timeout_minutes: float = 30.0) -> DistInfo:
    """Join torchrun's process group (once per process) and return this process's place.

    ``device`` is the device the single-process run would use; with several processes on
    CUDA each gets ``cuda:LOCAL_RANK`` (``cuda:0`` when it sees a single GPU: pinned to it
    through ``CUDA_VISIBLE_DEVICES``). ``backend`` defaults to NCCL on CUDA, gloo
    otherwise. Without torchrun's environment (or with ``WORLD_SIZE=1``) nothing is
    initialised and ``DistInfo(device=device)`` is returned.
    """
    device = torch.device(device)
    rank, world, local = env_ranks()
    if world == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        # One visible GPU: the launcher pinned this process to its own (CUDA_VISIBLE_DEVICES).
        index = 0 if count == 1 else local
        if index >= count:
            raise InputError(f"Process {rank} wants GPU {local}, but only {count} are visible: "
                             "give torchrun --nproc-per-node at most the number of GPUs.")
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("This PyTorch build has no torch.distributed; run a single process.")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local, backend, device)


def current(device: torch.device | str | None = None) -> DistInfo:
    """This process's place in an already initialised process group (``SINGLE`` if none)."""
    import torch.distributed as dist

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = env_ranks()[2] if "LOCAL_RANK" in os.environ else rank
    return DistInfo(rank, world, local, dist.get_backend(), dev)


def shard(per_rank: int, info: DistInfo = SINGLE) -> range:
    """The global sample indices of one step that rank ``info.rank`` draws."""
    return range(info.rank * per_rank, (info.rank + 1) * per_rank)


def wrap(model: nn.Module, info: DistInfo = SINGLE) -> nn.Module:
    """``model`` in DistributedDataParallel (gradients averaged over the ranks in
    ``backward``; rank 0's weights broadcast to all at construction), or ``model`` itself
    in a single process."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def no_sync(model: nn.Module, skip: bool):
    """Context in which ``backward`` keeps the gradients local (``skip`` true, DDP only)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def mean_over_ranks(value: float, info: DistInfo = SINGLE) -> float:
    """The average of ``value`` over all ranks (``value`` in a single process)."""
    if not info.distributed:
        return float(value)
    import torch.distributed as dist

    dev = info.device if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def all_mean(tensor: torch.Tensor, info: DistInfo = SINGLE) -> torch.Tensor:
    """The element-wise average of ``tensor`` over all ranks, differentiable (``tensor``
    itself in a single process)."""
    if not info.distributed:
        return tensor
    return _differentiable_sum(tensor) / info.world_size


def _differentiable_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks; gradients flow back to every rank's input."""
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():   # still the autograd-aware all-reduce in this PyTorch; deprecated name only
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(tensor)


def average_gradients(params, info: DistInfo = SINGLE) -> None:
    """Replace the ``.grad`` of ``params`` by its average over the ranks (one collective for
    all of them), for parameters outside a DDP wrapper. No-op in a single process."""
    if not info.distributed:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics in training are those of the whole global batch
    (sums exchanged over the ranks, differentiably), on any backend (PyTorch's own
    SyncBatchNorm needs a GPU). Same parameters and buffers as BatchNorm2d; on one process
    it is BatchNorm2d."""

    info: DistInfo = SINGLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.info.distributed):
            return super().forward(x)
        count = torch.tensor([float(x.numel() // x.shape[1])], dtype=x.dtype, device=x.device)
        stats = _differentiable_sum(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, info: DistInfo = SINGLE) -> nn.Module:
    """Make every BatchNorm2d of ``module`` use the global batch's statistics across the
    ranks (in place; nothing changes in a single process)."""
    if not info.distributed:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
            m.info = info
    return module


def barrier(info: DistInfo = SINGLE) -> None:
    if info.distributed:
        import torch.distributed as dist

        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def shutdown(info: DistInfo = SINGLE) -> None:
    if info.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
