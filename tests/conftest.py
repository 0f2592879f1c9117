"""Shared helpers: compose and train in this process, run the real CLI in a subprocess, read run outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# One torch thread here and in every `autoenc` the tests start: on a small shared machine, threads
# that wait on each other under other load slow a small model's step 20–70×.
os.environ["OMP_NUM_THREADS"] = "1"
# Decoded-image caches of the tests' folders go to a temporary directory, never the user's ~/.cache.
if "AUTOENC_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["AUTOENC_CACHE_DIR"] = tempfile.mkdtemp(prefix="autoenc-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AUTOENC_DATA_DIR", ROOT.parent / "shared" / "data"))
FAST = ["trainer=debug", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2", "eval.iwae_samples=4", "trainer.enable_model_summary=false",
        "trainer.enable_progress_bar=false"]


def compose(*overrides: str, run_dir: Path | str = "unused", fast: bool = True):
    """The config `autoenc train OVERRIDES` composes, writing into run_dir (Hydra not running): the way in
    that the CLI and the API take (autoenc.app.compose)."""
    from autoenc.app.compose import compose as compose_command

    return compose_command("train", [*(FAST if fast else []), *overrides, f"paths.output_dir={run_dir}"])


def train_here(run_dir: Path, *overrides: str, fast: bool = True) -> dict:
    """Validates and trains in this process, as `autoenc train` would, and returns its results."""
    from omegaconf import OmegaConf

    from autoenc.app.compose import run
    from autoenc.app.schema import validate

    cfg = compose(*overrides, run_dir=run_dir, fast=fast)
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # where `rebuilt` finds it
    return run(cfg)


def rebuilt(run_dir: Path, ckpt: str = "best.ckpt"):
    """A run's data module and model (eval mode) with the weights of one of its checkpoints."""
    from omegaconf import OmegaConf

    from autoenc.training.runs import build

    saved = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(saved if saved.is_file() else run_dir / "config.yaml")
    cfg.paths.output_dir = str(run_dir)
    datamodule, model, _ = build(cfg)
    state = torch.load(run_dir / "checkpoints" / ckpt, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    return datamodule, model.eval()


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


def one_line_error(proc) -> str:
    """The single stderr line of a command refused with exit code 2 and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def cli_here(*argv: str) -> None:
    """Runs `autoenc ARGV` in this process (main() sets Hydra's variables and sys.argv for its job:
    they are put back)."""
    from autoenc.app import cli

    env, argv0 = dict(os.environ), sys.argv
    try:
        cli.main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv0


def cli_error(capsys, *argv: str) -> str:
    """Runs `autoenc ARGV` in this process, expecting a refusal: exit code 2 and one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_here(*argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


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


def tb_scalar_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points over a run's event files, read once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list] = {}
    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar tag over a run's event files."""
    return tb_scalar_series(run_dir).get(tag, [])


def tb_hparams(run_dir: Path) -> list:
    """The HParams plugin's entries (HParamsPluginData: experiment, session start or end) of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    entries = []
    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        try:
            entries += [plugin_data_pb2.HParamsPluginData.FromString(c) for c in ea.PluginTagToContent("hparams").values()]
        except KeyError:  # an event file without HParams data
            pass
    return entries


def tb_text(run_dir: Path, tag: str) -> str:
    """The text summaries of one tag in a run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = ""
    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"tensors": 0})
        ea.Reload()
        if tag in ea.Tags()["tensors"]:
            text += "".join(e.tensor_proto.string_val[0].decode() for e in ea.Tensors(tag))
    return text


def hold_lock(run_dir: Path, command: str):
    """Another live run holding `run_dir`: a process with its .lock flocked, as a run has it (stop it with kill)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); "
            "f.write(f'{os.getpid()}\\n' + sys.argv[2] + '\\n'); f.flush(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock"), command], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip(f"no data at {SHARED_DATA}")
    return SHARED_DATA
