"""scripts/benchmark.py end to end on the embedded digits: every family and path, and a cost it must find."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from benchmark import FAMILIES  # noqa: E402


def test_benchmark_measures_each_path_and_finds_a_known_per_step_cost(tmp_path):
    """50 ms of sleep after each autoenc step must show as autoenc overhead, and not in the Lightning floor,
    which runs without it (a margin of 10 ms per step for a busy machine's preemptions over 6 steps).
    Two families (a deterministic and a stochastic one): each is the same code path, and CI's time is short."""
    out = tmp_path / "bench.json"
    delay = ["+callbacks.delay._target_=helpers.Delay", "+callbacks.delay.seconds=0.05"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--data", "digits",
                           "--families", "ae", "vae", "--steps", "6", "--warmup", "2", "--block", "3", "--out", str(out),
                           "--no-tuned", "--override",
                           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", *delay],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["families"]) == {"ae", "vae"} <= set(FAMILIES)
    assert result["env"]["batch_size"] == 128 and result["env"]["steps"] == 6 and result["env"]["threads"] == 1
    for family, row in result["families"].items():
        assert row["steps"] == 6 and row["peak_rss_mb"] > 0, family
        assert row["autoenc"]["overhead_us"] >= 40_000 > row["floor"]["overhead_us"] + 10_000, family
        assert row["autoenc"]["ratio"] < row["floor"]["ratio"], family
        assert row["autoenc"]["startup_s"] > 0 and row["plain"]["startup_s"] > 0
        # counted calls: Lightning's loop adds to the plain loop's, autoenc's callbacks to Lightning's
        assert 0 < row["plain"]["calls_per_step"] < row["floor"]["calls_per_step"] < row["autoenc"]["calls_per_step"], family
        # by where the code lives: the floor's loop calls no autoenc code but its model's; autoenc's adds callbacks
        for path in ("floor", "autoenc"):
            assert sum(row[path]["calls_by_origin"].values()) == row[path]["calls_per_step"], (family, path)
        assert row["floor"]["calls_by_origin"]["lightning"] > 0
        assert row["autoenc"]["calls_by_origin"]["autoenc"] > row["floor"]["calls_by_origin"]["autoenc"] > 0
        assert row["autoenc"]["overhead_us_median"] > 40_000 > row["floor"]["overhead_us_median"], family
        assert f"{family} " in proc.stdout  # one printed line per family
    assert 0 < result["process_to_first_step_s"] < 600


def test_progress_bar_redraws_by_time_and_at_the_end_of_each_pass(monkeypatch):
    """A redraw every refresh_interval seconds however short the steps, and always at a pass's last step."""
    import inspect

    from lightning.pytorch.callbacks import TQDMProgressBar

    import autoenc.training.callbacks
    from autoenc.training.callbacks import ProgressBar

    # the override is live only while Lightning's bar asks _should_update before each redraw
    assert "self._should_update(" in inspect.getsource(TQDMProgressBar.on_train_batch_end)
    bar = ProgressBar(refresh_interval=10.0, lines=False)  # the bar drawn on a terminal
    clock = iter([100.0, 105.0, 111.0, 112.0])
    monkeypatch.setattr(autoenc.training.callbacks.time, "monotonic", lambda: next(clock))
    assert [bar._should_update(n, 50) for n in (1, 2, 3, 50)] == [True, False, True, True]


def test_the_nvml_probe_variable_is_dropped_only_where_nvml_cannot_load(monkeypatch):
    """Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 costs a failed library load per Adam step without an NVIDIA
    driver: dropped there, with torch.cuda.is_available() unchanged; kept where the library loads."""
    import ctypes

    import torch

    from autoenc.training.runs import configure_lightning, skip_failing_gpu_probe

    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a machine whose driver has NVML
    skip_failing_gpu_probe()
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"
    monkeypatch.undo()
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return  # NVML loads on this machine: nothing more to check
    except OSError:
        pass
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    before = torch.cuda.is_available()
    configure_lightning()  # what train and every command that loads a model run first
    assert "PYTORCH_NVML_BASED_CUDA_CHECK" not in os.environ
    assert torch.cuda.is_available() == before


def test_a_step_checkpoint_that_saves_is_made(tmp_path):
    """callbacks.step_checkpoint.every_n_train_steps reaches the Trainer's step checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import compose
    from autoenc.training.runs import make_trainer

    def checkpoints(*overrides):
        trainer = make_trainer(compose(*overrides, run_dir=tmp_path, fast=False))
        return sorted((cb.monitor or "", cb._every_n_train_steps) for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint))

    assert checkpoints("callbacks.step_checkpoint.every_n_train_steps=7") == [("", 7), ("val/loss", 0)]


def test_the_hand_tuned_loop_trains_as_the_users_loop_does():
    """The benchmark's second reference (fused Adam, the whole step compiled) takes the same steps as the plain
    loop a user writes, up to float rounding: a faster loop, not another training."""
    import types

    import torch

    from benchmark import PlainLoop
    from conftest import compose

    args = types.SimpleNamespace(device="cpu", batch_size=32, precision="32-true")
    plain, tuned = PlainLoop(args, compose("model=ae")), PlainLoop(args, compose("model=ae"), tuned=True)
    plain.run(5), tuned.run(5)
    assert tuned.opt.defaults["fused"] and not plain.opt.defaults["fused"]
    for (name, a), b in zip(plain.model.state_dict().items(), tuned.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
