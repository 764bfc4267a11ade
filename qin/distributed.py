"""Multi-process training with torch.distributed, launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 the trainer wraps QIN in
DistributedDataParallel (NCCL on GPUs, gloo on the CPU). Each rank takes a contiguous share of
every global batch of the same shuffled order, so a step sees exactly the rows single-process
training would see at the same global batch. BatchNorm statistics are reduced over all ranks
(`SyncBatchNorm1d`), so the math equals single-process training up to summation order.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from qin.errors import ConfigError


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> Context:
    """This process's place in a torchrun job (RANK, WORLD_SIZE, LOCAL_RANK; one process without
    them). A value that is no such place (a variable left in a shell after a job) is a ConfigError
    naming it."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"the environment variable {name}={text!r} is not a whole number "
                              f"(torchrun sets it; unset it to run one process)") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"the environment variables RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} "
                          f"name no process of a job (RANK runs from 0 to WORLD_SIZE - 1; torchrun sets them; "
                          f"unset them to run one process)")
    return Context(rank, world_size, local_rank)


def setup(ctx: Context, device: torch.device) -> torch.device:
    """Join the process group (once) and return this rank's device."""
    if not ctx.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    else:
        # Share the cores among the ranks of this machine instead of oversubscribing them.
        # Of the cores this process may use (Slurm's --cpus-per-task, a container's cpuset), not
        # the machine's. (torchrun sets OMP_NUM_THREADS=1 for every rank, so it is not read.)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return device


@contextlib.contextmanager
def leaving_group_at_end():
    """Leave the process group (if one was joined) when the block ends. Ranks that got through it
    without an error first wait for each other: tearing the gloo connections down while a peer
    still works in the group can abort that peer (one rank of a 2-process CPU run died with
    SIGABRT at an unknown point, about once in five full test runs; this barrier is our guess at
    it, not a proven cure). A rank that failed leaves at once, so its peers are not kept waiting."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            _drop_reducers()
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        try:
            dist.barrier()  # raises if a peer died: the group is left all the same
        finally:
            _drop_reducers()
            dist.destroy_process_group()


# The DDP wrappers `wrap` made, so that leaving the group can free their Reducers first.
_wrapped: weakref.WeakSet = weakref.WeakSet()


def _drop_reducers() -> None:
    """Free each DDP wrapper's Reducer (and the Logger that holds it) while the group is still
    registered. A Reducer keeps the process group alive; freed after destroy_process_group, when
    its trainer goes, it held the group's last reference, and pybind11 frees a Reducer with the
    GIL held: gloo's destructor then joins its worker thread, which may still need the GIL to
    release the last collective's tensors. The rank hung there for good (1 run in 11 of the
    killed-rank test; a loop of 2-rank DDP rounds hangs within 50). Freed here, what still holds
    the group are Python's ProcessGroup objects, whose binding releases the GIL before the join.
    Not only DDP's own attributes hold them: torch.compile's wrappers of the DDP module copied its
    __dict__ (functools.wraps), so each dict holding one under DDP's name for it lets go."""
    for ddp in list(_wrapped):
        for name in ("logger", "reducer"):
            held = ddp.__dict__.get(name)
            if held is None:
                continue
            for holder in gc.get_referrers(held):
                if isinstance(holder, dict) and holder.get(name) is held:
                    del holder[name]


def all_gather_objects(ctx: Context, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def first_difference(ctx: Context, facts: dict) -> str | None:
    """Compare `facts` (name -> a small picklable value) across the ranks; on every rank, the first
    that differs, as "NAME: rank 0 has A, rank K has B", or None. Every rank must call it."""
    if not ctx.distributed:
        return None
    every = all_gather_objects(ctx, facts)
    for name, mine in every[0].items():
        for rank, theirs in enumerate(every[1:], start=1):
            if theirs.get(name) != mine:
                return f"{name}: rank 0 has {mine}, rank {rank} has {theirs.get(name)}"
    return None


def rank0_error(ctx: Context, error: str | None) -> str | None:
    """Rank 0's error (or None) on every rank, so that all stop where rank 0 alone found a problem."""
    if not ctx.distributed:
        return error
    return all_gather_objects(ctx, error)[0]


def shared(exc: Exception) -> Exception:
    """Mark an error that every rank raises alike (rank 0's verdict), so that only rank 0 prints it."""
    exc.shared_by_ranks = True
    return exc


def gather_rows(ctx: Context, values: np.ndarray) -> np.ndarray:
    """Concatenate each rank's contiguous share back into the split's row order, on every rank."""
    return np.concatenate(all_gather_objects(ctx, values))


class _AllReduceSum(torch.autograd.Function):
    """y = sum over ranks of x, with the gradient that makes it exact: every rank's loss depends
    on y, so dx on each rank is the sum over ranks of dL/dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch across all ranks.

    torch's nn.SyncBatchNorm runs on GPUs only; this one reduces (count, sum, sum of squares)
    with a differentiable all_reduce, so it works over gloo on the CPU as well as over NCCL,
    and gradients flow through the global statistics as in single-process BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # In fp32 whatever x's dtype (under autocast bf16 sums rounded to 16 bits drifted from
        # nn.BatchNorm1d's by 0.1), and in two passes: the global mean first, then the squares
        # about it (E[x^2] - mean^2 cancels where the mean is large against the spread).
        xf = x.float()
        first = _AllReduceSum.apply(torch.cat([xf.new_full((1,), float(x.shape[0])), xf.sum(0)]))
        count = first[0]
        mean = first[1:] / count
        centred = xf - mean
        var = _AllReduceSum.apply((centred * centred).sum(0)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            unbiased = var * count / (count - 1).clamp_min(1.0)
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        y = centred * torch.rsqrt(var + self.eps)
        y = y * self.weight + self.bias if self.affine else y
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in `module` by a SyncBatchNorm1d holding the same parameters and buffers."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            sync = SyncBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(child.weight.device if child.affine else "cpu")
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_batchnorm(child)
    return module


def wrap(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DistributedDataParallel over `model`, whose BatchNorm the caller has made SyncBatchNorm
    first (convert_batchnorm, as Trainer does; this does not convert). Buffers are not sent
    from rank 0 before each forward, DDP's default: QIN's item side data are buffers that never
    change (48 MiB on MicroLens, 40% of the gradients' all-reduce, every step), and the running
    statistics of SyncBatchNorm1d are already the global batch's on every rank."""
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the setting (broadcast_buffers still works there, with a warning).
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else "broadcast_buffers"
    wrapped = ddp(model, device_ids=[device] if device.type == "cuda" else None, **{name: False})
    _wrapped.add(wrapped)
    return wrapped


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers (compile wraps DDP under torchrun)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def local_loss(logits: torch.Tensor, labels: torch.Tensor, global_rows: int, world_size: int) -> torch.Tensor:
    """This rank's share of the global mean BCE, scaled so DDP's gradient average gives the global mean."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="sum") * (world_size / max(global_rows, 1))
