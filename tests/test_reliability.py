"""Reliability: one-line errors for user mistakes, safe checkpoints, interruption and resume."""

from __future__ import annotations

import errno
import os
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, autoenc, cli_error, compose, one_line_error, train_here


@pytest.mark.parametrize("overrides, expected", [
    (["model=foo"], "Available options in 'model': ae contractive denoising sparse vae"),
    (["model.latnet_dim=3"], "model.latnet_dim is not a setting of model (autoenc.training.module.AutoencoderModule); "
                             "did you mean model.latent_dim?"),
    (["+model.latnet_dim=3"], "model.latnet_dim is not a setting of model (autoenc.training.module.AutoencoderModule); "
                              "did you mean model.latent_dim?"),
    (["model.latent_dim=0"], "model.latent_dim=0 is invalid: it must be a positive integer"),
    (["noise=masking", "noise.p=1.5"], "noise.p=1.5 is invalid: it must be a fraction in [0, 1]"),
    (["model=vae", "bottleneck.beta=-1"], "bottleneck.beta=-1 is invalid"),
    (["bottleneck=topk", "bottleneck.k=99"], "bottleneck.k=99 is invalid: it must be an integer from 1 to model.latent_dim"),
    (["bottleneck=topk", "bottleneck.standardize=2"], "bottleneck.standardize=2 is invalid: it must be a momentum in [0, 1]"),
    (["model=vae", "penalty=kl"], "penalty=kl needs rates in [0, 1], which bottleneck=gaussian does not give"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid"),
    (["threads=0"], "threads=0 is invalid"),
    (["data=folder"], "data=folder needs the images' folder: data.path=DIR"),
    (["data=array"], "data=array needs a .npy, .npz or .pt file: data.path=? is not set"),
    pytest.param(["trainer=gpu"], "trainer.accelerator=gpu needs a CUDA GPU and none is visible here; use trainer=cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    pytest.param(["trainer.precision=16-mixed"], "trainer.precision=16-mixed (float16 autocast) needs a CUDA GPU and this "
                 "run trains on the CPU, where Lightning would switch to bf16-mixed; use trainer.precision=bf16-mixed",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
    (["trainer=cpu", "trainer.precision=16"], "trainer.precision=16 (float16 autocast) needs a CUDA GPU and this run "
                                              "trains on the CPU, where Lightning would switch to bf16-mixed; use "
                                              "trainer.precision=bf16-mixed"),
    (["data.binarize=dynamic", "data.standardize=true"], "data.binarize and data.standardize exclude each other"),
    (["ckpt_path=/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
])
def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, overrides, expected):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", *overrides)
    assert line.startswith("autoenc: error: ") and expected in line
    assert "Error in call to target" not in line  # the mistake itself, not Hydra's wrapping of it


def test_a_refusal_from_the_installed_command_is_one_line_and_exit_2_and_leaves_no_run_directory(tmp_path, capsys):
    line = one_line_error(autoenc("train", f"hydra.run.dir={tmp_path / 'run'}", "model.latent_dim=0", check=False))
    assert line.startswith("autoenc: error: model.latent_dim=0 is invalid")
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a directory with something of the user's in it stays
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'kept'}", "model.latent_dim=0")
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    proc = autoenc("train", f"hydra.run.dir={tmp_path}", "model.latent_dim=0", check=False,
                   env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    assert "no images" in cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", "data=folder", f"data.path={tmp_path / 'imgs'}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rel") / "run"
    return run_dir, train_here(run_dir)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_crafted_to_run_code_is_refused(tmp_path, capsys):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil(marker)}, evil)
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'r'}", f"ckpt_path={evil}")
    assert "refused to load" in line and not marker.exists()


def test_array_files_that_cannot_be_used_are_refused_in_one_line_leaving_no_run_directory(tmp_path, capsys, trained):
    marker = tmp_path / "pwned"
    torch.save({"x": torch.rand(50, 10), "y": "abc"}, tmp_path / "string_y.pt")
    torch.save({"x": Evil(marker)}, tmp_path / "crafted.pt")
    np.save(tmp_path / "whole.npy", np.random.rand(100, 10).astype("float32"))
    whole = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[: len(whole) // 2])
    for name, expected in [
        ("string_y.pt", "string_y.pt: y must hold one whole-number label per example; it is a <U3 array of shape ()"),
        ("crafted.pt", "crafted.pt: it is not a torch.save of tensors (a tensor, or a dict of x and y); it was "
                       "opened with weights_only=True"),
        ("cut.npy", "cut.npy is truncated: its header declares a float32 array of shape (100, 10) (4,128 bytes), "
                    "the file has 2,064"),
    ]:
        line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / name}-run", "data=array",
                         f"data.path={tmp_path / name}")
        assert expected in line and not (tmp_path / f"{name}-run").exists(), line
    assert not marker.exists()
    line = cli_error(capsys, "encode", f"ckpt={trained[0]}", f"input={tmp_path / 'missing.npy'}")
    assert line.endswith(f"input={tmp_path / 'missing.npy'} does not exist; give a folder of images or a .npy/.npz/.pt file")


def test_an_array_of_examples_without_features_is_refused_in_one_line_leaving_no_run_directory(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((10, 0), np.float32))
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "data=array", f"data.path={tmp_path / 'empty.npy'}")
    assert line == (f"autoenc: error: {tmp_path / 'empty.npy'} holds an array of shape (10, 0): its examples have no "
                    "features; give each example at least one value")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, expected", [
    (lambda good: good[: len(good) // 2], "truncated or not a checkpoint"),
    (lambda good: b"hello, not a checkpoint", "is not a checkpoint (a .ckpt file that `autoenc train` wrote)"),
])
def test_truncated_or_foreign_checkpoint(tmp_path, capsys, trained, content, expected):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content((trained[0] / "checkpoints" / "last.ckpt").read_bytes()))
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'r'}", f"ckpt_path={bad}")
    assert expected in line


def test_checkpoint_of_another_model_is_refused(tmp_path, capsys, trained):
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", f"ckpt_path={ckpt}", "model.latent_dim=3")
    assert "is from a different model" in line


def test_non_finite_loss_stops_with_the_step(tmp_path, capsys):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", *FAST, "model.optimizer._target_=torch.optim.SGD",
                     "model.optimizer.lr=1e30")
    assert "the training loss became nan at step" in line or "the training loss became inf at step" in line
    step = int(line.split(" at step ")[1].split()[0])
    assert 0 < step <= 3 and "(epoch 0)" in line  # SGD at 1e30 overflows within FAST's 3 steps


def test_lightning_gradient_clipping_bounds_the_step(tmp_path):
    """With SGD at lr 1 the one step's parameter change is the clipped gradient: its norm is the clip."""
    import lightning.pytorch as pl

    from autoenc.training.runs import build

    clip = 1e-3
    overrides = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0", "model.scheduler=null",
                 f"trainer.gradient_clip_val={clip}", "trainer.limit_train_batches=1"]
    train_here(tmp_path, *overrides)
    pl.seed_everything(0, workers=True, verbose=False)  # as train() does: the same initial weights
    _, model, _ = build(compose(*overrides))
    after = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    change = torch.cat([(after[k] - v).flatten() for k, v in model.state_dict().items()]).norm()
    assert change == pytest.approx(clip, rel=1e-3)


def test_same_seed_same_results(tmp_path, trained):
    again = train_here(tmp_path / "again")
    assert again == trained[1]


def test_full_disk_is_one_line(monkeypatch, capsys):
    from autoenc.app import cli

    def boom(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/last.ckpt")

    module = type(sys)("tests_full_disk")
    module.boom = boom
    monkeypatch.setitem(sys.modules, "tests_full_disk", module)
    monkeypatch.setattr(cli, "_relaunchable", lambda command: None)  # outside a Hydra run
    with pytest.raises(SystemExit) as exit_:
        cli._task("train")(OmegaConf.create({"run": "tests_full_disk:boom"}))
    assert exit_.value.code == 2
    assert "no space left on device writing /x/last.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("target, setting, expected", [
    ("autoenc.model.bottlenecks.TopK", {"k": 0}, "bottleneck.k=0 is invalid"),
    ("autoenc.model.bottlenecks.Gaussian", {"beta": -1}, "bottleneck.beta=-1 is invalid"),
    ("autoenc.model.noise.Masking", {"p": 1.5}, "noise.p=1.5 is invalid"),
    ("autoenc.model.penalties.KL", {"rho": 0}, "penalty.rho=0 is invalid"),
    ("autoenc.model.likelihoods.Gaussian", {"sigma": 0}, "likelihood.sigma=0 is invalid"),
])
def test_objects_check_their_own_settings_when_built_from_python_too(target, setting, expected):
    from hydra.utils import get_object

    from autoenc.util.errors import UserError

    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        get_object(target)(**setting)


def test_a_top_k_wider_than_the_code_is_refused_where_the_autoencoder_is_built():
    from autoenc.model.bottlenecks import TopK
    from autoenc.model.core import Autoencoder
    from autoenc.util.errors import UserError
    from autoenc.model.backbones import mlp

    with pytest.raises(UserError, match="bottleneck.k=9 is invalid: it must be an integer from 1 to model.latent_dim"):
        Autoencoder(mlp, (1, 4, 4), latent_dim=8, bottleneck=TopK(k=9))


def test_a_run_directory_belongs_to_one_run(tmp_path, capsys):
    """Another live run's lock, or another run's results, refuse a second run into the directory in one line;
    a resume of that run, or overwrite=true, goes ahead."""
    import subprocess

    run = tmp_path / "run"
    train_run = ["train", f"hydra.run.dir={run}", *FAST]
    from conftest import cli_here, hold_lock

    cli_here(*train_run)
    before = (run / "results.json").read_text()
    line = cli_error(capsys, *train_run, "model=vae")
    assert line == (f"autoenc: error: {run} already holds a run (results.json and checkpoints); resume it with "
                    f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}, choose another hydra.run.dir=, or add "
                    "overwrite=true to replace it")
    assert (run / "results.json").read_text() == before and not (run / "samples.png").exists()
    holder = hold_lock(run, "train model=ae")
    try:
        line = cli_error(capsys, *train_run, "overwrite=true")
        assert f"is being written by another run (process {holder.pid}: autoenc train model=ae)" in line
    finally:
        holder.kill()
        holder.wait()
    cli_here(*train_run, "model=vae", "overwrite=true")  # the holder is gone: its lock went with it
    assert (run / "samples.png").exists() and not (run / ".lock").exists()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a directory")
    assert "cannot write the run directory" in cli_error(capsys, "train", f"hydra.run.dir={blocked / 'run'}", *FAST)


def test_resuming_a_run_goes_back_into_its_directory_without_lightning_warnings(tmp_path):
    run = tmp_path / "run"
    autoenc("train", f"hydra.run.dir={run}", *FAST)
    proc = autoenc("train", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *FAST, "trainer.max_epochs=2",
                   cwd=tmp_path)
    assert f"run directory: {run}" in proc.stdout and not (tmp_path / "outputs").exists()
    assert "dirpath has changed" not in proc.stderr + proc.stdout


def test_settings_that_would_train_on_nothing_are_refused_before_anything_runs(tmp_path, capsys):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", "data.val_fraction=1.0")
    assert "data.val_fraction=1.0 is invalid: it must be a fraction in [0, 1)" in line
    assert not (tmp_path / "run").exists()


def test_a_file_that_is_not_a_checkpoint_is_named_as_such(tmp_path, capsys):
    from PIL import Image

    Image.new("L", (4, 4)).save(tmp_path / "picture.png")
    line = cli_error(capsys, "sample", f"ckpt={tmp_path / 'picture.png'}")
    assert line.startswith(f"autoenc: error: {tmp_path / 'picture.png'} is not a checkpoint")
    line = cli_error(capsys, "sample", f"ckpt={tmp_path}")
    assert "is a directory without checkpoints/best.ckpt or last.ckpt" in line


def test_a_value_hydra_cannot_parse_gets_the_quoting_that_works(capsys):
    line = cli_error(capsys, "train", "data.path=/data/my imgs ü")
    assert line.endswith("""inside the shell's quotes: 'data.path="/data/my imgs ü"'""")


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import autoenc.app.commands
    from conftest import cli_here

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(autoenc.app.commands, "evaluate", interrupted)
    with pytest.raises(SystemExit) as exit_:
        cli_here("evaluate", f"ckpt={tmp_path / 'x.ckpt'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 130
    assert err == ["autoenc: interrupted: `autoenc evaluate` stopped by SIGINT before it finished and wrote nothing more"]


def test_resume_true_needs_the_directory_it_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "train", "resume=true")
    assert line == ("autoenc: error: resume=true continues the run in hydra.run.dir=: name that directory (or resume "
                    "a checkpoint with ckpt_path=…)")
    line = cli_error(capsys, "train", "-m", "resume=true", "model.latent_dim=2,3")
    assert line == "autoenc: error: resume=true continues the sweep in hydra.sweep.dir=: name that directory"
    assert not list(tmp_path.iterdir())


def test_a_taken_default_run_directory_moves_to_the_next_name_and_a_given_one_is_refused(tmp_path):
    """What two runs started in the same second meet: the default name held by another live run (its .lock) or
    holding an earlier run moves on to <name>_2, _3; the same directory given by hand is refused."""
    import subprocess

    from autoenc.training.rundir import claim
    from autoenc.util.errors import UserError
    from conftest import hold_lock

    run = tmp_path / "12-00-00_ae_digits"
    holder = hold_lock(run, "train seed=1")
    try:
        second = claim(run, command="train seed=2", default=True)
        assert second.dir == tmp_path / "12-00-00_ae_digits_2" and (second.dir / ".lock").is_file()
        with pytest.raises(UserError, match="is being written by another run"):
            claim(run, command="train seed=2")
        (second.dir / "results.json").write_text("{}")
        second.accepted = True
        second.release()
        third = claim(run, command="train seed=3", default=True)
        assert third.dir == tmp_path / "12-00-00_ae_digits_3"
        third.release()
        assert not third.dir.exists()  # refused before it started: the folder it made is gone
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_removes_only_what_an_earlier_run_wrote_and_never_the_current_directory(tmp_path, capsys, monkeypatch):
    """overwrite=true replaces the earlier run's files (pictures, checkpoints, events, .hydra) and keeps a user's own;
    a run directory given as `..`-laden path is the same directory; the working directory itself is never cleared."""
    from conftest import cli_here

    run = tmp_path / "run"
    cli_here("train", f"hydra.run.dir={run}", *FAST, "model=vae")
    (run / "notes.txt").write_text("mine")
    events = set(run.glob("events.out.tfevents.*"))
    cli_here("train", f"hydra.run.dir={tmp_path / 'elsewhere' / '..' / 'run'}", *FAST, "overwrite=true")
    assert (run / "notes.txt").read_text() == "mine" and not (run / "samples.png").exists()  # the VAE's picture went
    assert not events & set(run.glob("events.out.tfevents.*")) and (run / "results.json").is_file()
    monkeypatch.chdir(run)
    line = cli_error(capsys, "train", "hydra.run.dir=.", *FAST, "overwrite=true")
    assert line == f"autoenc: error: overwrite=true would clear {run}, which holds the current directory; choose another hydra.run.dir="
    assert (run / "notes.txt").is_file() and (run / "results.json").is_file()
