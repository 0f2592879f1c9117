"""`train(cfg)`: compose → instantiate → fit → test → results.json; importable without the CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from autoenc.errors import UserError

log = logging.getLogger("autoenc")


def configure_lightning() -> None:
    """Process-wide Lightning settings for every command: no start-up chatter that says nothing a user can
    act on, and no GPU probe that fails at every optimizer step."""
    skip_failing_gpu_probe()
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*is deprecated.*",
                    ".*Checkpoint directory .* exists and is not empty.*",
                    ".*The number of training batches .* is smaller than the logging interval.*",
                    ".*when logging on epoch level in distributed setting.*", ".*litlogger.*",
                    ".*was configured so 100% of the batches.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def skip_failing_gpu_probe() -> None:
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that every torch.cuda.is_available()
    (Adam.step asks at each step) first tries to load libnvidia-ml; without an NVIDIA driver that fails
    every time (Adam.step on a small net: 90 µs instead of 44 here). Where the library cannot load, torch
    answers the same without the variable, so it is dropped."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, redrawn at most every `refresh_interval` seconds and at the end of each pass:
    a redraw (its metrics and a terminal write, about 0.3 ms) every 10 steps cost 30–40 µs of each 5 ms step."""

    def __init__(self, refresh_interval: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.refresh_interval, self._drawn = refresh_interval, -math.inf

    def _should_update(self, current: int, total) -> bool:
        if not super()._should_update(current, total):
            return False
        now = time.monotonic()
        if current == total or now - self._drawn >= self.refresh_interval:
            self._drawn = now
            return True
        return False


def write_json(path: Path, data: dict) -> None:
    """Writes JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Reads a checkpoint as tensors and plain data only (weights_only): nothing in it can run."""
    import pickle

    import torch

    p = Path(str(path))
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; give the path of a .ckpt file in a run's checkpoints/")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refused to load {p}: it holds objects other than tensors and plain data, which "
                        f"could run code ({str(e).splitlines()[-1]})") from None
    except Exception as e:
        raise UserError(f"cannot read checkpoint {p}: it is truncated or not a checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{p} is not an autoenc checkpoint (it has no state_dict)")
    return ckpt


def restore(model, ckpt: dict, path) -> None:
    """Loads a checkpoint's weights into `model`, or says in one line that it is another model's."""
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(f"{path} is from a different model than this config builds ({str(e).splitlines()[0]}); "
                        "use the model/net/data settings of the run that wrote it") from None


class SafetyNet(Callback):
    """Ctrl-C stops at the end of the current step and saves last.ckpt there, so that a resume continues
    exactly (a second Ctrl-C stops at once, saving nothing); a non-finite training loss stops the run,
    naming its step. The losses are checked every `log_every_n_steps` steps, at epoch ends and before
    any checkpoint is written: one host sync per check, not per step, and no checkpoint of a diverged
    model."""

    def __init__(self, dirpath: str):
        self.last = Path(dirpath) / "last.ckpt"
        self._losses: list = []  # (optimizer step, detached loss) since the last check
        self.stopping, self._handler = False, None

    def _ask_to_stop(self, signum, frame):
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        print("\nstopping at the end of this step (Ctrl-C again to stop at once)", flush=True)

    def on_train_start(self, trainer, pl_module):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._handler = signal.signal(signal.SIGINT, self._ask_to_stop)

    def on_train_end(self, trainer, pl_module):
        import signal

        if self._handler is not None:
            signal.signal(signal.SIGINT, self._handler)
            self._handler = None

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
        if self.stopping:
            self.stop(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)

    def stop(self, trainer) -> None:
        """Saves last.ckpt at this step boundary and ends the run (as Ctrl-C does in Lightning)."""
        trainer.save_checkpoint(self.last, weights_only=False)
        print(f"interrupted at step {trainer.global_step}; saved {self.last}; "
              f"resume with: autoenc train ckpt_path={self.last}", flush=True)
        raise KeyboardInterrupt

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and not self.stopping:
            print(f"interrupted at step {trainer.global_step}; last checkpoint: "
                  f"{self.last if self.last.is_file() else 'none'}", flush=True)

    def check(self, trainer) -> None:
        import torch

        if not self._losses:
            return
        (steps, losses), self._losses = zip(*self._losses), []
        finite = torch.isfinite(torch.stack(losses))
        if not finite.all():
            first = int(finite.int().argmin())  # the first non-finite step since the last check
            kept = f"the last good checkpoint is kept: {self.last}" if self.last.is_file() else "no checkpoint was saved yet"
            raise UserError(f"the training loss became {losses[first].item()} at step {steps[first]} (epoch "
                            f"{trainer.current_epoch}); lower model.optimizer.lr or check the data; {kept}")


def build(cfg: DictConfig):
    """The data module and the model a config describes (the model built from the data's shape)."""
    datamodule = make(cfg.data)
    seams = {k: make(cfg[k]) if cfg.get(k) else None for k in ("noise", "bottleneck", "penalty", "likelihood")}
    model = make(cfg.model, net=make(cfg.net), shape=datamodule.shape, **seams)
    return datamodule, model


def make(node, **kwargs):
    """hydra.utils.instantiate, with a user's mistake found while building reported as itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def check_range(datamodule, likelihood) -> None:
    """Refuses data a bounded likelihood cannot model (values outside [0, 1]) in one line."""
    if likelihood.bounds is None:
        return
    lo, hi = datamodule.value_range()
    if lo < likelihood.bounds[0] or hi > likelihood.bounds[1]:
        raise UserError(f"the training data spans [{lo:.4g}, {hi:.4g}], outside the [0, 1] that "
                        f"likelihood={type(likelihood).__name__.lower()} models; use likelihood=mse or "
                        "likelihood=gaussian likelihood.bounded=false")


def never_saves(node) -> bool:
    """A checkpoint callback config whose every_n_train_steps and every_n_epochs are both 0 (and no
    train_time_interval): Lightning would call its hooks every step for nothing (about 4 µs a hook)."""
    off = all(k in node and not node[k] for k in ("every_n_train_steps", "every_n_epochs"))
    return off and not node.get("train_time_interval")


def make_trainer(cfg: DictConfig, *extra_callbacks):
    """The Trainer a config describes, with its callbacks and loggers (the progress bar only when
    trainer.enable_progress_bar is on, as Lightning requires; no checkpoint callback that never saves)."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar

    callbacks = [cb for cb in (instantiate(c) for c in cfg.callbacks.values() if c and not never_saves(c))
                 if cfg.trainer.enable_progress_bar or not isinstance(cb, AnyProgressBar)]
    loggers = [make(c) for c in cfg.logger.values() if c] if cfg.logger else False
    return instantiate(cfg.trainer, callbacks=callbacks + list(extra_callbacks), logger=loggers)


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains, tests the best checkpoint, writes results.json: its best val score and test metrics."""
    import lightning.pytorch as pl

    configure_lightning()
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    check_range(datamodule, model.likelihood)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer = make_trainer(cfg)
    if cfg.ckpt_path:
        restore(model, load_checkpoint(cfg.ckpt_path), cfg.ckpt_path)  # a clear error before Lightning reads it
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    ckpt = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)  # the best-by-val/loss one
    best = ckpt.best_model_path if ckpt else ""
    # The tested checkpoint's monitored score (best val/loss): what `-m` searches optimize.
    results = {ckpt.monitor: float(ckpt.best_model_score)} if best and ckpt.best_model_score is not None else {}
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
    results |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/") and v.numel() == 1}
    if trainer.is_global_zero:
        write_json(out / "results.json", results)
        from autoenc.loggers import log_run

        log_run(trainer.loggers, hparams_of(cfg), cfg, results)
        print(f"run directory: {out.resolve()}")
        print(json.dumps(results, indent=2, sort_keys=True))
    return results


def hparams_of(cfg: DictConfig) -> dict:
    """The choices and numbers that tell runs apart, flattened for TensorBoard's HParams view."""
    from hydra.core.hydra_config import HydraConfig

    flat = {}
    if HydraConfig.initialized():
        flat.update({f"choice/{k}": str(v) for k, v in HydraConfig.get().runtime.choices.items()
                     if not k.startswith("hydra") and v is not None})
    for group in ("model", "net", "data", "noise", "bottleneck", "penalty", "likelihood"):
        node = OmegaConf.to_container(cfg[group], resolve=True) if cfg.get(group) else {}
        for k, v in (node or {}).items():
            if isinstance(v, (int, float, str, bool)) and not k.startswith("_"):
                flat[f"{group}.{k}"] = v
    return flat
