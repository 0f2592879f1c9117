"""Agreement across DDP ranks, so that a seam's batch statistics and decisions are those of one process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed() -> bool:
    """Whether this process is one of several DDP ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_batch_mean(code: torch.Tensor) -> torch.Tensor:
    """Each unit's mean over the global batch: under DDP the sum over every rank's equal shard, by a
    differentiable all-reduce, so that the rate ρ̂ and its gradient are those of one process."""
    if not distributed():
        return code.mean(0)
    from torch.distributed.nn.functional import all_reduce  # (only where a process group exists)

    return all_reduce(code.sum(0)) / (len(code) * dist.get_world_size())


def any_over_ranks(flags: torch.Tensor) -> None:
    """In place: true where any DDP rank's flag is (all ranks then agree on which units are dead)."""
    if distributed():
        as_int = flags.int()
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        flags.copy_(as_int.bool())


def sum_over_ranks(t: torch.Tensor) -> None:
    """In place: the sum over DDP ranks (unchanged in one process)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def from_rank0(t: torch.Tensor) -> None:
    """In place: rank 0's value on every DDP rank (unchanged in one process)."""
    if distributed():
        dist.broadcast(t, src=0)


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every rank's equal-sized t concatenated in rank order (each rank holds a contiguous share of the
    global batch, so this is the global batch); t itself in one process."""
    if not distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
