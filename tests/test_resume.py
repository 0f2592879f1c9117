"""Exact resume: a run stopped at any step (Ctrl-C, SIGKILL after a step checkpoint) and resumed ends with the
weights and results of the run never stopped; checkpoint and results writes are atomic."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, train_here, train_run

# Every source of training randomness at once: the reparameterization, the masking noise and the
# dynamic binarization; 41 steps an epoch, 3 epochs.
RANDOM = ["model=vae", "noise=masking", "data.binarize=dynamic", "trainer.max_epochs=3", "trainer.log_every_n_steps=5",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval.iwae_samples=8"]
STEPS_PER_EPOCH = 41


def weights(run_dir, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a_dir, a_results, b_dir, b_results) -> None:
    assert a_results == b_results
    for name in ("last.ckpt", "best.ckpt"):
        wa, wb = weights(a_dir, name), weights(b_dir, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "full"
    return run_dir, train_here(run_dir, *RANDOM, fast=False)


@pytest.mark.parametrize("step", [7, 52])  # inside the first and the second epoch
def test_ctrl_c_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, step):
    stopped = tmp_path / "stopped"
    with pytest.raises(SystemExit):  # Lightning ends an interrupted fit with exit code 1
        train_here(stopped, *RANDOM, "+callbacks.ctrl_c._target_=helpers.CtrlC", f"+callbacks.ctrl_c.step={step}",
                   fast=False)
    saved = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    epoch, position = divmod(saved["global_step"], STEPS_PER_EPOCH)
    assert position != 0  # a mid-epoch state, not an epoch end; the loader's state says where in the data:
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": epoch, "position": position, "seed": 0}]
    resumed = tmp_path / "resumed"
    results = train_here(resumed, *RANDOM, f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}", fast=False)
    assert_same_run(resumed, results, *uninterrupted)


def _wait_for_step_checkpoint(path, proc, timeout=120) -> int:
    start = time.time()
    while True:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < timeout
        if path.exists():
            try:
                step = torch.load(path, weights_only=True)["global_step"]
            except Exception:  # noqa: BLE001 - the file is replaced atomically, but be patient
                step = 0
            if step % STEPS_PER_EPOCH:
                return step
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_after_a_step_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    every = ["callbacks.step_checkpoint.every_n_train_steps=9"]
    full = train_run(tmp_path / "full", *RANDOM, *every, fast=False)
    proc = subprocess.Popen([sys.executable, "-m", "autoenc", "train", f"hydra.run.dir={tmp_path / 'killed'}",
                             *RANDOM, *every], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    step = _wait_for_step_checkpoint(last, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert step % 9 == 0
    resumed = train_run(tmp_path / "resumed", *RANDOM, *every, f"ckpt_path={last}", fast=False)
    assert_same_run(tmp_path / "resumed", resumed, tmp_path / "full", full)
    # checkpoints written every 9 steps do not change the training itself
    assert_same_run(tmp_path / "full", full, *uninterrupted)


@pytest.mark.slow
def test_ctrl_c_from_the_terminal_stops_at_a_step_and_saves(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "autoenc", "train", f"hydra.run.dir={tmp_path}", "data.batch_size=16",
                             "trainer.max_epochs=1000", "trainer.enable_progress_bar=false",
                             "callbacks.step_checkpoint.every_n_train_steps=20"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "checkpoints" / "last.ckpt"
    _wait_for_step_checkpoint(last, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert "Traceback" not in out and "stopping at the end of this step" in out
    assert proc.returncode == 130
    step = int(out.split("interrupted by SIGINT at step ")[1].split(";")[0])
    assert torch.load(last, weights_only=True)["global_step"] == step > 0


def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, uninterrupted, monkeypatch):
    import lightning.pytorch as pl
    from fsspec.implementations.local import LocalFileOpener

    from autoenc.training.runs import build
    from conftest import compose

    target = tmp_path / "last.ckpt"
    target.write_bytes((uninterrupted[0] / "checkpoints" / "last.ckpt").read_bytes())
    before = target.read_bytes()

    plain_write = LocalFileOpener.write

    def half_then_fail(self, data):  # the disk fills up, or the process dies, halfway through
        plain_write(self, data[: len(data) // 2])
        raise OSError("simulated failure during the write")

    monkeypatch.setattr(LocalFileOpener, "write", half_then_fail)
    _, model, _ = build(compose())
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=1,
                         limit_val_batches=0, enable_checkpointing=False)
    trainer.strategy.connect(model)
    with pytest.raises(OSError, match="simulated failure"):
        trainer.strategy.checkpoint_io.save_checkpoint({"state_dict": model.state_dict()}, target)
    assert target.read_bytes() == before and torch.load(target, weights_only=True)["global_step"] > 0


def test_results_json_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from pathlib import Path

    from autoenc.training import runs as train

    path = tmp_path / "results.json"
    train.write_json(path, {"a": 1})
    plain_write = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):
        plain_write(self, text[: len(text) // 2])
        raise OSError("simulated failure during the write")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="simulated failure"):
        train.write_json(path, {"a": 2, "b": [3] * 100})
    assert json.loads(path.read_text()) == {"a": 1}
