"""End-to-end tests of `autoenc train` on the embedded digits: files, tags, metrics, resume, errors."""

from __future__ import annotations


import pytest
import torch
from omegaconf import OmegaConf

from conftest import autoenc, cli_error, tb_hparams, tb_scalars, tb_tags, tb_text, train_here, train_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "ae"
    results = train_run(run_dir, "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                        "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=1.0",
                        "trainer.log_every_n_steps=2")
    return run_dir, results


def test_run_directory_holds_config_checkpoints_events_results_pictures(run):
    run_dir, results = run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"best.ckpt", "last.ckpt"}
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "reconstructions.png").stat().st_size > 0
    assert {"test/loss", "test/mse"} <= results.keys()


def test_tensorboard_has_curves_learning_rate_and_reconstruction_grid(run):
    tags = tb_tags(run[0])
    assert {"loss/train", "loss/train_epoch", "loss/val", "val/mse", "train/lr"} <= tags["scalars"]
    assert "val/reconstructions" in tags["images"]


def test_tensorboard_leads_with_the_losses_and_shows_the_results_as_a_table_and_hparams(run):
    """The losses form the first group (`loss` sorts first), no `epoch` card, the test figures at the run's
    last step (not at step 0) and as a text table, an HParams session named after the run and its
    overrides, and no Experiment entry (it would fix every run's columns to this one's)."""
    run_dir, results = run
    scalars = tb_tags(run_dir)["scalars"]
    groups = sorted({t.split("/")[0] for t in scalars})
    assert groups[0] == "loss" and "epoch" not in scalars and not {"train/loss_step", "val/loss"} & scalars
    steps = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert tb_scalars(run_dir, "test/mse") == [(steps, pytest.approx(results["test/mse"], rel=1e-6))] and steps == 8
    text, entries = tb_text(run_dir, "results/text_summary"), tb_hparams(run_dir)
    for k, v in results.items():
        assert f"| {k} | {v:.6g} |" in text
    assert not any(e.HasField("experiment") for e in entries)
    start = next(e.session_start_info for e in entries if e.HasField("session_start_info"))
    assert start.group_name.startswith(f"{run_dir.parent.name}/ae ") and "trainer.max_epochs=2" in start.group_name
    assert start.hparams["choice/model"].string_value == "ae" and "choice/logger" not in start.hparams
    assert start.hparams["model.latent_dim"].number_value == 16


def test_test_mse_equals_recomputation_from_the_best_checkpoint(run):
    run_dir, results = run
    from autoenc.training.runs import build

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run_dir)
    datamodule, model, _ = build(cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    x, _ = datamodule.splits["test"]
    with torch.no_grad():
        x_hat = torch.sigmoid(model.autoencoder.decoder(model.autoencoder.encoder(x)))
    assert results["test/mse"] == pytest.approx(((x_hat - x) ** 2).mean().item(), rel=1e-4)
    assert 0 < results["test/mse"] < 0.25


def test_resume_continues_from_the_saved_epoch(run, tmp_path):
    run_dir, _ = run
    first = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert first["epoch"] == 1
    resumed = tmp_path / "resumed"
    train_here(resumed, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=3",
               "trainer.limit_train_batches=4", "trainer.limit_val_batches=1.0")
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    assert last["global_step"] == first["global_step"] + 4  # one more epoch of 4 batches, not three


def test_missing_data_root_is_one_line_error(tmp_path, capsys):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", "data=mnist", f"data.root={tmp_path / 'nowhere'}")
    assert "train-images-idx3-ubyte" in line and "AUTOENC_DATA_DIR" in line


def test_help_lists_groups_and_cfg_prints_the_config():
    out = autoenc("train", "--help").stdout
    for group in ("model:", "net:", "data:", "noise:", "bottleneck:", "penalty:", "likelihood:", "trainer:", "logger:"):
        assert group in out
    assert "vae" in out and "fashion_mnist" in out and "ddp" in out and "topk" in out
    cfg = autoenc("train", "model=vae", "model.latent_dim=7", "--cfg", "job").stdout
    assert "autoenc.model.bottlenecks.Gaussian" in cfg and "latent_dim: 7" in cfg


def test_unknown_command_is_one_line_error():
    proc = autoenc("trian", check=False)
    assert proc.returncode == 2 and "choose one of: train" in proc.stderr


def test_threads_auto_follows_omp_num_threads_else_half_the_cores(monkeypatch):
    import os

    from autoenc.util.threads import set_threads

    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_threads("auto")
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        set_threads("auto")
        assert torch.get_num_threads() == 3
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_every_command_applies_threads_before_it_works(tmp_path, capsys):
    from conftest import FAST, cli_error

    try:  # refused after the threads are set: the run itself is not needed
        cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", *FAST, "threads=3", f"ckpt_path={tmp_path / 'none.ckpt'}")
        assert torch.get_num_threads() == 3
        cli_error(capsys, "evaluate", "threads=2", f"ckpt={tmp_path / 'none.ckpt'}")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_output_to_a_file_gets_plain_progress_lines_not_bar_redraws(tmp_path):
    proc = autoenc("train", f"hydra.run.dir={tmp_path / 'run'}", "trainer.max_epochs=2", "trainer.limit_train_batches=5",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in lines] == [["epoch 1/2", "step 5/5"], ["epoch 2/2", "step 5/5"]]
    assert "train/loss_epoch" in lines[0] and lines[0].endswith("steps/s")
    assert "\r" not in proc.stdout + proc.stderr and proc.stdout.count("Total params") == 1


def figures(line: str) -> dict[str, float]:
    words = line.split()
    return {k: float(v) for k, v in zip(words, words[1:]) if k in ("loss", "train/loss_epoch", "val/loss")}


def test_progress_lines_show_the_last_steps_loss_and_each_epochs_own_mean_and_the_run_says_what_next(tmp_path):
    """Each line's `loss` is that step's loss and each epoch line that epoch's own mean (TensorBoard's figures,
    written independently); the last epoch's line is there; the test says it runs; the closing lines say
    where the pictures, checkpoints and logs are and which commands use the run."""
    run = tmp_path / "run"
    proc = autoenc("train", f"hydra.run.dir={run}", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
                   "callbacks.progress.line_interval=0", "trainer.enable_model_summary=false")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    step_lines = [figures(line)["loss"] for line in lines if "loss" in figures(line)]
    epoch_lines = [figures(line)["train/loss_epoch"] for line in lines if "loss" not in figures(line)]
    assert step_lines == pytest.approx([v for _, v in tb_scalars(run, "loss/train")], rel=1e-3) and len(step_lines) == 8
    assert epoch_lines == pytest.approx([v for _, v in tb_scalars(run, "loss/train_epoch")], rel=1e-3)
    assert len(epoch_lines) == 2
    assert "testing the best checkpoint: 2 batches" in proc.stdout
    closing = proc.stdout[proc.stdout.index(f"run directory: {run}"):].splitlines()
    assert closing[1].split() == ["pictures:", "reconstructions.png"]
    assert f"tensorboard --logdir {run}" in closing[3] and f"autoenc evaluate ckpt={run}" in closing[4]


def test_no_validation_split_is_said_in_one_autoenc_line_not_lightning_warnings(tmp_path):
    proc = autoenc("train", f"hydra.run.dir={tmp_path / 'run'}", "data.val_fraction=0", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=3", "trainer.limit_test_batches=1")
    said = proc.stdout + proc.stderr
    assert "no validation split (data.val_fraction=0): no best.ckpt is chosen" in said
    assert "monitored key" not in said and "Warning" not in said and "test/loss" in said
