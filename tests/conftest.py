"""Shared fixtures: run the real CLI in a subprocess, read run directories and TensorBoard events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOENC_DATA_DIR", ROOT.parent / "shared" / "data"))
FAST = ["trainer=debug", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2", "eval.iwae_samples=4", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false"]


def autoenc(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None):
    """Runs `python -m autoenc ARGS` and returns the CompletedProcess (stdout+stderr captured)."""
    proc = subprocess.run([sys.executable, "-m", "autoenc", *args], cwd=cwd or ROOT, text=True,
                          capture_output=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"autoenc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def train_run(run_dir: Path, *overrides: str, fast: bool = True) -> dict:
    """Trains into run_dir through the CLI and returns its results.json."""
    autoenc("train", f"hydra.run.dir={run_dir}", *(FAST if fast else []), *overrides)
    return json.loads((run_dir / "results.json").read_text())


def tb_tags(run_dir: Path) -> dict[str, set[str]]:
    """Scalar, image and histogram tags in every TensorBoard event file of a run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set(), "histograms": set()}
    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"images": 0})
        ea.Reload()
        for kind in tags:
            tags[kind] |= set(ea.Tags()[kind])
    return tags


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"no data at {SHARED_DATA}")
    return SHARED_DATA
