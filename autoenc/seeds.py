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
