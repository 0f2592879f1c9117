"""Seeds of independent random streams, derived from (run seed, stream, epoch, rank)."""

from __future__ import annotations

import zlib

import numpy as np


def derive(seed: int, stream: str, epoch: int = 0, rank: int = 0) -> int:
    """A 63-bit seed for one stream: no two (seed, stream, epoch, rank) share it, so the shuffle, the
    noise, the binarization and the model's sampling never draw the same numbers, and a run resumed
    at an epoch redraws that epoch's exactly (numpy's SeedSequence hashes the whole key)."""
    key = (zlib.crc32(stream.encode()), int(epoch), int(rank))
    state = np.random.SeedSequence(int(seed), spawn_key=key).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


_MASK = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for one step of a stream seeded `seed` (splitmix64): cheap enough for every step."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return (z ^ (z >> 31)) >> 1


class Stream:
    """A stream of training randomness (noise, sampling, binarization) whose generator is reseeded at
    every optimizer step from (seed, stream, rank, step): a run resumed at any step draws exactly what
    the uninterrupted run drew there."""

    def __init__(self, seed: int, name: str, rank: int = 0):
        self.seed, self.generator = derive(seed, name, 0, rank), None

    def at(self, step: int, device):
        import torch

        if self.generator is None or self.generator.device != torch.device(device):
            self.generator = torch.Generator(device=device)
        return self.generator.manual_seed(step_seed(self.seed, step))
