"""The training run's Lightning callbacks: the progress bar, the pictures, Ctrl-C and non-finite losses."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.profilers import PassThroughProfiler

from autoenc.model.bottlenecks import Stochastic
from autoenc.util.errors import Interrupt, UserError
from autoenc.util.slurm import requeue, slurm_job
from autoenc.util.pictures import (code_usage, decoder_features, fixed_examples, image_loggers, make_grid, picture,
                                   publish, square)


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every `refresh_interval` seconds and at the end of each pass:
    a redraw (its metrics and a terminal write) every few steps costs a measurable share of a small model's
    step. When the output is not a terminal (a file, a pipe, a job log; or with `lines=true`): no redraws,
    but a plain line every `line_interval` seconds (epoch, step, the last step's loss, steps per second),
    one per epoch with that epoch's own mean loss and validation loss, and lines while the final test runs.
    Either way `loss` is the last step's training loss (read from the device only when shown)."""

    def __init__(self, refresh_interval: float = 0.25, line_interval: float = 30.0, lines: bool | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.refresh_interval, self._drawn = refresh_interval, -math.inf
        self.line_interval, self.lines = line_interval, not sys.stdout.isatty() if lines is None else lines
        self._last_line = (time.monotonic(), 0)  # when the last line was written, and at which step
        self._loss = None  # the last training step's loss, a tensor on the device
        self._ended: int | None = None  # an epoch whose line waits for its own figures
        if self.lines:
            self.disable()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("train/loss_step", None)  # written every log_every_n_steps steps only: stale in between
        return {"loss": self._loss.item(), **metrics} if self._loss is not None else metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.lines and time.monotonic() - self._last_line[0] >= self.line_interval:
            self.print_line(trainer, f"step {batch_idx + 1}/{trainer.num_training_batches}", self.get_metrics(trainer, pl_module))

    # The module logs an epoch's mean loss after the callbacks' on_train_epoch_end: its line is printed at
    # the next epoch's start, or at the end of training, when the figures are that epoch's own.
    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self._ended = trainer.current_epoch if self.lines else None

    def on_train_epoch_start(self, trainer, pl_module):
        self._print_epoch_line(trainer, pl_module)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._print_epoch_line(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def _print_epoch_line(self, trainer, pl_module) -> None:
        if self._ended is None:
            return
        figures = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "train/loss_step"}
        self.print_line(trainer, f"step {trainer.num_training_batches}/{trainer.num_training_batches}", figures, self._ended)
        self._ended = None

    def on_test_start(self, trainer, pl_module):
        super().on_test_start(trainer, pl_module)
        if self.lines:
            total = sum(trainer.num_test_batches)
            print(f"testing{' the best checkpoint' if trainer.ckpt_path else ''}: {total} batches", flush=True)
            self._last_line = (time.monotonic(), 0)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        now = time.monotonic()
        if self.lines and now - self._last_line[0] >= self.line_interval:
            rate = (batch_idx + 1 - self._last_line[1]) / max(now - self._last_line[0], 1e-9)
            print(f"testing  batch {batch_idx + 1}/{sum(trainer.num_test_batches)}  {rate:.2f} batches/s", flush=True)
            self._last_line = now, batch_idx + 1

    def print_line(self, trainer, where: str, figures: dict, epoch: int | None = None) -> None:
        """One plain progress line."""
        now, step = time.monotonic(), trainer.global_step
        rate = (step - self._last_line[1]) / max(now - self._last_line[0], 1e-9)
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items() if k != "v_num")
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        epoch = trainer.current_epoch if epoch is None else epoch
        print(f"epoch {epoch + 1}{epochs}  {where}  {shown}  {rate:.1f} steps/s", flush=True)
        self._last_line = now, step

    def _should_update(self, current: int, total) -> bool:
        if not super()._should_update(current, total):
            return False
        now = time.monotonic()
        if current == total or now - self._drawn >= self.refresh_interval:
            self._drawn = now
            return True
        return False

def resume_command(last) -> str:
    """The command that resumes this run from `last`: `autoenc train`, the run's own overrides, ckpt_path=."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    given = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")] if HydraConfig.initialized() else []
    return shlex.join(["autoenc", "train", *given, f"ckpt_path={last}"])


class Pictures(Callback):
    """The run's pictures, to TensorBoard at each validation and as PNGs in the run directory: rows of
    input | noisy (with noise) | reconstruction for validation images; prior samples (Stochastic
    bottleneck); the units' activation frequencies and the decoder's features (codes with active
    units); the decoded latent manifold and a scatter of test codes (2-D latent). Images only: vector
    data gets the histogram and scatter."""

    def __init__(self, dirpath: str = ".", reconstructions: int = 8, samples: int = 64, manifold: int = 20,
                 scatter_examples: int = 2000, seed: int = 0):
        self.dir, self.n, self.samples, self.manifold = Path(dirpath), reconstructions, samples, manifold
        self.scatter_examples, self.seed = scatter_examples, seed

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        ae = pl_module.autoencoder
        if trainer.sanity_checking or len(ae.shape) != 3:
            return
        if self.n:
            x, y = fixed_examples(trainer, "val", self.n, pl_module.device)
            x_tilde = ae.corrupt(x, torch.Generator(device=x.device).manual_seed(pl_module.noise_seed))
            rows, labels = [x], ["input"]
            if ae.noise is not None:
                rows, labels = rows + [x_tilde], labels + ["noisy"]
            rows, labels = rows + [ae.reconstruct(x_tilde, y)], labels + ["denoised" if ae.noise is not None else "reconstruction"]
            publish(trainer, "val/reconstructions", picture(rows, labels), self.dir / "reconstructions.png")
        if self.samples and isinstance(ae.bottleneck, Stochastic):
            g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            given = ae.condition.rows()
            if given:  # a conditional model: a row of samples per label (the same prior draws in each row)
                n = max(1, self.samples // len(given))
                z = ae.bottleneck.prior_sample(n, g, pl_module.device)
                rows = [ae.likelihood.mean(ae.decode(z, y)) for _, y in given]
                publish(trainer, "val/samples", picture(rows, [name for name, _ in given]), self.dir / "samples.png")
            else:
                x = ae.sample(self.samples, generator=g)
                publish(trainer, "val/samples", picture(square(x)), self.dir / "samples.png")
        if self.manifold and ae.code_shape == (2,):
            # Points at evenly spaced quantiles of N(0, 1), as in Kingma & Welling (2014), fig. 4.
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, self.manifold))
            zz = torch.cartesian_prod(q.flip(0), q)[:, [1, 0]].to(pl_module.device)
            x = ae.likelihood.mean(ae.decode(zz)).float()  # (TensorBoard reads no bfloat16)
            publish(trainer, "val/latent_manifold", make_grid(x.cpu(), nrow=self.manifold, padding=0),
                    self.dir / "manifold.png")

    def on_validation_end(self, trainer, pl_module):
        # Not on_validation_epoch_end: callbacks run before the module's hook that computes the figures.
        freq = pl_module.epoch_figures.get("activation_frequency")
        if freq is None or trainer.sanity_checking:
            return
        for writer in [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_histogram")]:
            writer.add_histogram("val/activation_frequency", freq.float().cpu(), trainer.global_step)

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module):
        figures, ae = pl_module.epoch_figures, pl_module.autoencoder
        if len(ae.shape) != 3:
            return
        if "activation_frequency" in figures:
            publish(trainer, "features", decoder_features(ae, figures["activation_frequency"]), self.dir / "features.png")
        elif "code_frequency" in figures:
            publish(trainer, "features", code_usage(ae, figures["code_frequency"]), self.dir / "features.png")

    @torch.no_grad()
    def on_test_epoch_end(self, trainer, pl_module):
        if pl_module.autoencoder.code_shape != (2,) or not self.scatter_examples or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, y = fixed_examples(trainer, "test", self.scatter_examples, pl_module.device)
        z = pl_module.autoencoder.encode(x).code.float().cpu()
        fig, ax = plt.subplots(figsize=(6, 6))
        points = ax.scatter(z[:, 0], z[:, 1], c=y.cpu(), cmap="tab10", s=4)
        fig.colorbar(points, ax=ax, label="label")
        ax.set(xlabel="z₁", ylabel="z₂", title="test-set latent codes")
        self.dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.dir / "latent_scatter.png", dpi=100, bbox_inches="tight")
        for writer in image_loggers(trainer):
            writer.add_figure("test/latent_scatter", fig, trainer.global_step)
        plt.close(fig)


class SafetyNet(Callback):
    """Ctrl-C, SIGTERM (a scheduler's stop, `kill`, `docker stop`) and, in a SLURM job, SIGUSR1 stop the run at
    the end of the current step and save last.ckpt there, so that a resume continues exactly (a second
    signal stops at once, saving nothing); a SLURM job stopped by SIGUSR1 is requeued, and resumes when it
    restarts.
    A non-finite training loss stops the run, naming its step. The losses are checked every
    `log_every_n_steps` steps, at epoch ends and before any checkpoint is written: one host sync per check,
    not per step, and no checkpoint of a diverged model."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self, dirpath: str):
        self.last = Path(dirpath) / "last.ckpt"
        self._losses: list = []  # (optimizer step, detached loss) since the last check
        self.stopping, self._handlers = False, {}

    def _ask_to_stop(self, signum, frame):
        import signal

        Interrupt.signal = signum
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping at the end of this step ({name} again to stop at once)", flush=True)

    def on_train_start(self, trainer, pl_module):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            names = self.SIGNALS if slurm_job() else self.SIGNALS[:2]
            self._handlers = {s: signal.signal(s, self._ask_to_stop) for s in (getattr(signal, n) for n in names)}

    def on_train_end(self, trainer, pl_module):
        import signal

        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers = {}
        if self.stopping:  # a signal after the last step's check: stop here rather than run the test
            self.stop(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append((trainer.global_step, loss.detach()))
        due = len(self._losses) >= (trainer.log_every_n_steps or 1)
        if due:
            self.check(trainer)
        if trainer.world_size == 1:
            stop = self.stopping
        else:  # every rank must stop at the same step: they agree at each check
            stop = due and trainer.strategy.reduce_boolean_decision(self.stopping, all=False)
        if stop:
            self.stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check(trainer)
        if trainer.world_size > 1:  # every rank reaches this hook: they agree, or one would wait for the rest
            self.stopping = trainer.strategy.reduce_boolean_decision(self.stopping, all=False)
        if self.stopping:
            self.stop(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)

    def stop(self, trainer) -> None:
        """Saves last.ckpt at this step boundary and ends the run (as Ctrl-C does in Lightning); a SLURM job
        stopped by its signal is requeued first."""
        import signal

        trainer.save_checkpoint(self.last, weights_only=False)
        name = signal.Signals(Interrupt.signal or signal.SIGINT).name
        then = f"resume with: {resume_command(self.last)}"
        if Interrupt.signal == getattr(signal, "SIGUSR1", None) and slurm_job() and trainer.is_global_zero:
            then = requeue(slurm_job(), self.last) or then
        print(f"interrupted by {name} at step {trainer.global_step}; saved {self.last}; {then}", flush=True)
        Interrupt.reported = True
        raise KeyboardInterrupt

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and not self.stopping:
            print(f"interrupted at step {trainer.global_step}; last checkpoint: "
                  f"{self.last if self.last.is_file() else 'none'}", flush=True)
            Interrupt.reported = True

    def check(self, trainer) -> None:
        if not self._losses:
            return
        (steps, losses), self._losses = zip(*self._losses), []
        finite = torch.isfinite(torch.stack(losses))
        if not finite.all():
            first = int(finite.int().argmin())  # the first non-finite step since the last check
            kept = f"the last good checkpoint is kept: {self.last}" if self.last.is_file() else "no checkpoint was saved yet"
            hint = ("trainer.precision=16-true trains in float16 without loss scaling; use bf16-mixed or bf16-true"
                    if str(trainer.precision) == "16-true" else "lower model.optimizer.lr or check the data")
            raise UserError(f"the training loss became {losses[first].item()} at step {steps[first]} (epoch "
                            f"{trainer.current_epoch}); {hint}; {kept}")


class StoredConfig(Callback):
    """Stores the run's config, as built, in every checkpoint (`autoenc_config`), interpolations kept (the data
    root is found anew where the model is used), and the shape of an example (`autoenc_shape`): what the
    commands and `autoenc.load` rebuild the model from, without reading the data."""

    def __init__(self, config, shape):
        from omegaconf import OmegaConf

        self.config, self.shape = OmegaConf.to_container(config), list(shape)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["autoenc_config"], checkpoint["autoenc_shape"] = self.config, self.shape


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with last.ckpt the last state: written at every validation whether or not
    the monitored figure improved (Lightning writes it only when a top-k checkpoint was saved) and when
    training ends however it ends (epochs, max_steps inside an epoch, max_time); Ctrl-C and SIGTERM are
    SafetyNet's. Temporary files that a killed write left beside the checkpoints are removed."""

    _last_step = None

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            for stale in Path(self.dirpath).glob(f".*{self.FILE_EXTENSION}.tmp"):
                stale.unlink(missing_ok=True)

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)  # resumes runs of before

    # After Lightning's own saves at the same hook: its top-k save is skipped at a step already saved.
    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._write_last(trainer)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._write_last(trainer)

    def on_train_end(self, trainer, pl_module):
        self._write_last(trainer)

    def _write_last(self, trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if (self.save_last and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING
                and self._last_step != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_step = trainer.global_step


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, flushed and fsynced, then renamed over it, so the
    previous checkpoint stays whole through a kill or a full disk wherever $TMPDIR is (Lightning's fsspec
    transaction writes in $TMPDIR and, on another filesystem, copies onto the destination). A full disk is
    one line naming the directory and the space the checkpoint needs."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import errno
        import io
        import os

        if "://" in str(path):  # a remote store: fsspec's own
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise UserError(f"no space left on device for {path.name} in {path.parent}: it needs "
                                f"{buffer.getbuffer().nbytes / 2**20:.1f} MiB; the previous {path.name} is kept; "
                                "free some space and resume, or point hydra.run.dir= at another disk") from None
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


class NoProfiler(PassThroughProfiler):
    """Lightning's pass-through profiler with one shared null context instead of a generator per action:
    fewer Python calls for each hook Lightning dispatches, which together with Lightning's other per-step
    calls is a measurable share of a small model's step (docs/speed.md); trainer.profiler=simple or
    advanced still gets Lightning's own."""

    _null = contextlib.nullcontext()

    def profile(self, action_name: str):
        return self._null
