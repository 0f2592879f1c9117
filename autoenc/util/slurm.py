"""The SLURM job this process runs in, and requeueing it, so that a job stopped before its end resumes."""

from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("autoenc")


def slurm_job() -> str | None:
    """This process's SLURM job (<array job>_<task> for an array task), None outside SLURM or in an
    interactive allocation (no batch job to requeue)."""
    if os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID")


def restarted() -> bool:
    """Whether this SLURM job is a requeued one (SLURM counts its restarts)."""
    return slurm_job() is not None and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def requeue(job: str, last) -> str | None:
    """Puts `job` back in SLURM's queue (`scontrol requeue`); what happens next, in words, or None if it failed."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning(f"could not requeue SLURM job {job} ({e}); resume it with ckpt_path={last}")
        return None
    if done.returncode != 0:
        log.warning(f"scontrol requeue {job} failed: {(done.stderr or done.stdout).strip()}; resume it with ckpt_path={last}")
        return None
    return f"requeued SLURM job {job}: it continues from there when it restarts"
