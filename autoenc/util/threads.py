"""torch's threads for a command, from its `threads=` setting."""

from __future__ import annotations

import os


def set_threads(threads) -> None:
    """torch's intra-op threads for this command (`threads=`): a number; `auto`, OMP_NUM_THREADS if set,
    else half the cores this process may use, so that other load on the machine cannot stall threads that
    wait on each other (docs/speed.md); null keeps torch's default of one per core."""
    from autoenc.util.errors import is_integer, require

    require(threads in (None, "auto") or (is_integer(threads) and threads >= 1), "threads", threads,
            "auto, null (torch's default) or a positive integer")
    if threads == "auto":
        threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, len(os.sched_getaffinity(0)) // 2))
    if threads:
        import torch

        torch.set_num_threads(threads)
