"""Learning-rate schedules: the default cosine follows the run's length per step or per epoch, an unbounded run
trains at a constant rate, and ReduceLROnPlateau watches val/loss."""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch

from autoenc.training.runs import build
from conftest import compose, tb_scalars, train_here

LR = 3e-3


def cosine(step: int, total: int) -> float:
    return LR * (1 + math.cos(math.pi * step / total)) / 2


def test_default_cosine_decays_per_step_over_the_whole_run(tmp_path):
    train_here(tmp_path, "trainer.max_epochs=2", "trainer.log_every_n_steps=1")  # 3 steps an epoch
    lrs = tb_scalars(tmp_path, "train/lr")
    assert [s for s, _ in lrs] == list(range(6))
    assert [v for _, v in lrs] == pytest.approx([cosine(s, 6) for s in range(6)], rel=1e-5)


def test_per_epoch_interval_steps_once_an_epoch(tmp_path):
    train_here(tmp_path, "trainer.max_epochs=3", "trainer.log_every_n_steps=1", "model.lr_schedule.interval=epoch")
    lrs = dict(tb_scalars(tmp_path, "train/lr"))
    assert [lrs[s] for s in (0, 2, 3, 5, 6, 8)] == pytest.approx([cosine(e, 3) for e in (0, 0, 1, 1, 2, 2)], rel=1e-5)


@pytest.mark.parametrize("length", [["trainer.max_epochs=-1", "trainer.max_steps=6"], ["~trainer.max_epochs", "trainer.max_steps=6"]])
def test_a_run_bounded_by_steps_alone_decays_over_its_steps(tmp_path, length):
    train_here(tmp_path, *length, "trainer.log_every_n_steps=1")
    lrs = [v for _, v in tb_scalars(tmp_path, "train/lr")]
    assert lrs == pytest.approx([cosine(s, 6) for s in range(6)], rel=1e-5)  # never back up: no 1, 0, 1, 0…


def test_an_unbounded_run_trains_at_a_constant_rate_and_says_so(tmp_path, caplog):
    class StopAfterFour(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step >= 4

    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    _, model, _ = build(compose("trainer.max_epochs=-1", run_dir=tmp_path))
    datamodule = build(compose())[0]
    trainer = pl.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[StopAfterFour(), Record()])
    with caplog.at_level(logging.WARNING, logger="autoenc"):
        trainer.fit(model, datamodule=datamodule)
    assert lrs == [LR] * 4
    assert "needs the run's length" in caplog.text and "constant rate" in caplog.text


def test_reduce_on_plateau_watches_val_loss(tmp_path):
    # A threshold no epoch can beat: after the first epoch, every epoch is a plateau and halves the rate.
    train_here(tmp_path, "trainer.max_epochs=3", "model.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
               "+model.scheduler.patience=0", "+model.scheduler.factor=0.5", "+model.scheduler.threshold=1e9",
               "+model.scheduler.threshold_mode=abs", "model.lr_schedule.interval=epoch", "trainer.log_every_n_steps=1")
    lrs = dict(tb_scalars(tmp_path, "train/lr"))
    assert [lrs[s] for s in (0, 3, 6)] == pytest.approx([LR, LR, LR / 2])
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)  # saved at the last validation,
    assert last["lr_schedulers"][0]["_last_lr"] == pytest.approx([LR / 2])       # before that epoch's step


def test_gradient_accumulation_of_two_half_batches_is_one_step_of_the_whole_batch(tmp_path):
    """Lightning's accumulate_grad_batches: 2 × 16 examples, one SGD step, equal to 1 × 32 (the same 32:
    the shuffle does not depend on the batch size)."""
    sgd = ["model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=0.5", "model.scheduler=null",
           "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0"]
    train_here(tmp_path / "acc", *sgd, "data.batch_size=16", "trainer.accumulate_grad_batches=2",
               "trainer.limit_train_batches=2")
    train_here(tmp_path / "one", *sgd, "data.batch_size=32", "trainer.limit_train_batches=1")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True) for d in ("acc", "one"))
    assert a["global_step"] == b["global_step"] == 1
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-5, atol=1e-6)
