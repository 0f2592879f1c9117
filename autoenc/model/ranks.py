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
