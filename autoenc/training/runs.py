"""The run layer: build a run's data and model from its config, read and restore checkpoints, rebuild a
trained run from its directory; shared by `train`, the commands, the Python API, the tests and the scripts."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from autoenc.util.errors import UserError, is_integer, require
from autoenc.training.rundir import run_dir_of
from autoenc.util.paths import SEAMS

log = logging.getLogger("autoenc")


def configure_lightning() -> None:
    """Process-wide Lightning settings for every command: no start-up chatter that says nothing a user can
    act on, and no GPU probe that fails at every optimizer step."""
    skip_failing_gpu_probe()
    for pattern in (".*LeafSpec.*", ".*Checkpoint directory .* exists and is not empty.*",
                    ".*The number of training batches .* is smaller than the logging interval.*",
                    ".*when logging on epoch level in distributed setting.*", ".*could not find the monitored key.*",
                    ".*dirpath has changed from.*", ".*across ranks is zero.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    if logging.getLogger().handlers:  # the root logs (Hydra's console and file): one copy of each message
        for name in ("lightning", "lightning.pytorch"):  # each adds its own console handler on import
            for handler in list(logging.getLogger(name).handlers):
                logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).propagate = True
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


def skip_failing_gpu_probe() -> None:
    """Importing Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1, so that every torch.cuda.is_available()
    (Adam.step asks at each step) first tries to load libnvidia-ml; without an NVIDIA driver that fails
    every time, at a cost a small model's step feels. Where the library cannot load, torch
    answers the same without the variable, so it is dropped."""
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
        return
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


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
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save writes a zip archive (or, before 1.6, a pickle)
        raise UserError(f"{p} is not a checkpoint (a .ckpt file that `autoenc train` wrote); give one from a "
                        "run's checkpoints/, or the run directory")
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
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # the first says only "Error(s) in loading state_dict"
        detail = detail if len(detail) <= 240 else detail[:239] + "…"
        raise UserError(f"{path} is from a different model than this config builds ({detail}); "
                        "use the model/net/data settings of the run that wrote it") from None


def build(cfg: DictConfig, shape=None):
    """The data module (as a Trainer takes it) and the LightningModule a config describes (the model built for
    `shape`, by default the data's), and the config as built: `cfg` itself, or with likelihood=auto
    resolved (what checkpoints store)."""
    from autoenc.training.datamodule import lightning_data

    datamodule = instantiate(cfg.data)
    cfg = resolved(cfg, datamodule)
    return lightning_data(datamodule), lightning_module(cfg, shape or datamodule.shape), cfg


def seams_of(cfg: DictConfig) -> dict:
    return {k: instantiate(cfg[k]) if cfg.get(k) else None for k in SEAMS}


def lightning_module(cfg: DictConfig, shape, autoencoder=None):
    """The LightningModule (autoenc.training.module) of a built config, for examples of `shape`, around
    `autoencoder` where one is given."""
    built = {} if autoencoder is None else {"autoencoder": autoencoder}
    return instantiate(cfg.model, net=instantiate(cfg.net), shape=tuple(shape), **seams_of(cfg), **built)


def autoencoder(cfg: DictConfig, shape):
    """The plain Autoencoder of a built config, as its LightningModule holds it, without Lightning: what using
    a trained model needs."""
    from autoenc.model.conditions import Condition
    from autoenc.model.core import Autoencoder

    m = cfg.model
    return Autoencoder(instantiate(cfg.net), tuple(shape), m.latent_dim, weight_penalty=m.get("weight_penalty", 0.0),
                       condition=Condition.named(m.get("condition"), m.get("labels")), **seams_of(cfg))


def resolved(cfg: DictConfig, datamodule) -> DictConfig:
    """What the data decides, in a copy of `cfg` (what checkpoints store), each said in one line:
    likelihood=auto, the likelihood the training split's range chooses (likelihoods.Auto); a conditional
    model's labels left null, the training split's classes or attribute names. Any other config as it is."""
    from autoenc.model.likelihoods import Auto

    decided = {}
    chooser = instantiate(cfg.likelihood) if cfg.get("likelihood") else None
    if isinstance(chooser, Auto):
        lo, hi = datamodule.value_range()
        decided["likelihood"] = chooser.choose((lo, hi))
        log.info(f"likelihood=auto: {decided['likelihood']._target_.rsplit('.', 1)[-1]} "
                 f"(the training data spans [{lo:.4g}, {hi:.4g}])")
    if cfg.model.get("condition") and cfg.model.get("labels") is None:
        decided["model.labels"] = labels_of(datamodule, cfg.model.condition)
        log.info(f"model.condition={cfg.model.condition}: model.labels={decided['model.labels']} (from the training data)")
    if not decided:
        return cfg
    chosen = copy.deepcopy(cfg)
    for key, value in decided.items():
        OmegaConf.update(chosen, key, value, merge=False)
    return chosen


def labels_of(datamodule, condition: str):
    """What a conditional model is conditioned on (Condition.labels_from), from the training split."""
    from autoenc.model.conditions import Condition

    kind = Condition.kind(condition)  # an unknown name is refused before the data is read
    return kind.labels_from(datamodule.splits["train"][1], list(getattr(datamodule, "attribute_names", []) or []))


def instantiate(node, **kwargs):
    """hydra.utils.instantiate, with a user's mistake found while building reported as itself."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
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


def make_trainer(cfg: DictConfig, *extra_callbacks):
    """The Trainer a config describes, with its callbacks and loggers (the progress bar only when
    trainer.enable_progress_bar is on, as Lightning requires); without a profiler asked for, NoProfiler."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    from autoenc.training.callbacks import AtomicCheckpointIO, NoProfiler

    epochs = cfg.trainer.get("max_epochs")
    require(epochs in (None, -1) or (is_integer(epochs) and epochs >= 1), "trainer.max_epochs", epochs,
            "a positive integer (or -1)")
    callbacks = [cb for cb in (instantiate(c) for c in cfg.callbacks.values() if c)
                 if cfg.trainer.enable_progress_bar or not isinstance(cb, ProgressBar)]
    if cfg.trainer.get("enable_model_summary", True):  # the plain table (Lightning's default is rich's where installed)
        callbacks.append(ModelSummary())
    loggers = [instantiate(c) for c in cfg.logger.values() if c] if cfg.logger else False
    profiler = {} if cfg.trainer.get("profiler") else {"profiler": NoProfiler()}
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # SafetyNet saves at a step boundary and requeues: not Lightning's handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return instantiate(cfg.trainer, callbacks=callbacks + list(extra_callbacks), logger=loggers, plugins=plugins,
                       **profiler)


# Where each module of autoenc 0.2 lives since 0.3: the `_target_`s its checkpoints store name the old ones.
MOVED = {"errors": "util.errors", "seeds": "util.seeds", "viz": "util.pictures", "paths": "util.paths",
         "core": "model.core", "bottlenecks": "model.bottlenecks", "penalties": "model.penalties",
         "likelihoods": "model.likelihoods", "corruption": "model.noise", "nets": "model.backbones",
         "metrics": "model.metrics", "datasets": "data.sources", "cache": "data.cache", "data": "data.module",
         "module": "training.module", "callbacks": "training.callbacks", "loggers": "training.loggers",
         "runs": "training.runs", "training": "training.train", "compare": "evaluation.compare",
         "cli": "app.cli", "api": "app.api", "use": "app.commands", "schema": "app.schema"}


def moved(node):
    """A stored config with every `_target_` of a 0.2 module renamed to where it lives now."""
    if isinstance(node, dict):
        return {k: _renamed(v) if k == "_target_" else moved(v) for k, v in node.items()}
    if isinstance(node, list):
        return [moved(v) for v in node]
    return node


def _renamed(target):
    parts = str(target).split(".")
    if len(parts) == 3 and parts[0] == "autoenc" and parts[1] in MOVED:
        return f"autoenc.{MOVED[parts[1]]}.{parts[2]}"
    return target


EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"


def is_export(path) -> bool:
    """Whether a path is a folder that `autoenc export` wrote (its config and its safetensors weights)."""
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / EXPORT_WEIGHTS).is_file() and not (p / "checkpoints").is_dir()


def load_export(folder: Path) -> dict:
    """An exported folder read as a checkpoint would be: the config and shape from config.json, the weights
    (and the data's standardization statistics, under `datamodule.`) from model.safetensors, which holds
    tensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        described = json.loads((folder / EXPORT_CONFIG).read_text())
        config, shape = described["config"], described["shape"]
        tensors = load_file(str(folder / EXPORT_WEIGHTS))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise UserError(f"{folder} is not a model folder that `autoenc export` wrote ({type(e).__name__}: {e}); "
                        f"it needs {EXPORT_CONFIG} (config, shape) and {EXPORT_WEIGHTS}") from None
    stats = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("datamodule.")}
    state = {k: v for k, v in tensors.items() if not k.startswith("datamodule.")}
    return {"state_dict": state, "autoenc_config": config, "autoenc_shape": shape,
            described.get("data_module", ""): stats}


@dataclass
class Run:
    """A trained run rebuilt from its directory: the directory, its config, its data module and its
    Autoencoder (eval mode, on `device`) with the checkpoint's weights; its LightningModule (for a test loop)
    made on first use, around the same Autoencoder."""

    dir: Path
    cfg: DictConfig
    datamodule: object
    autoencoder: object

    @property
    def iwae_chunk(self) -> int:
        return int(self.cfg.model.get("iwae_chunk", 100))

    @cached_property
    def module(self):
        configure_lightning()
        return lightning_module(self.cfg, self.autoencoder.shape, self.autoencoder).eval()


def device() -> str:
    """Where a trained model runs by default: the GPU if there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_checkpoint(path) -> Path:
    """The checkpoint a path names: the file itself, or in a run directory checkpoints/best.ckpt (else last.ckpt)."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        found = next((p / "checkpoints" / n for n in ("best.ckpt", "last.ckpt") if (p / "checkpoints" / n).is_file()), None)
        if found is None:
            raise UserError(f"{p} is a directory without checkpoints/best.ckpt or last.ckpt; give a run directory "
                            "that `autoenc train` wrote, or the path of a .ckpt file")
        return found
    return p


def load_run(path, iwae_samples: int | None = None, on: str | None = None, run_dir: Path | None = None) -> Run:
    """Rebuilds the model of a checkpoint (or of a run directory's best one, or of an exported folder) from
    its run's config and loads the weights (weights_only, or safetensors) and the data's standardization
    statistics stored with them. `run_dir`: where commands write (default: the run's directory)."""
    require(iwae_samples is None or (is_integer(iwae_samples) and iwae_samples >= 0), "eval.iwae_samples",
            iwae_samples, "an integer ≥ 0")
    if is_export(path):
        path = Path(str(path)).expanduser()
        ckpt = load_export(path)
        run_dir = run_dir or path
    else:
        path = find_checkpoint(path)
        ckpt = load_checkpoint(path)
        # the run directory: the nearest folder above the checkpoint that holds the run's .hydra/
        run_dir = run_dir or run_dir_of(path.resolve()) or (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    saved = run_dir / ".hydra" / "config.yaml"
    if "autoenc_config" in ckpt:  # what the weights were trained with, which no later command can rewrite
        run_cfg = OmegaConf.create(moved(ckpt["autoenc_config"]))
    elif saved.is_file():
        run_cfg = OmegaConf.create(moved(OmegaConf.to_container(OmegaConf.load(saved))))
    else:
        raise UserError(f"{path} stores no config and {saved} is missing; use a checkpoint inside "
                        "the run directory that `autoenc train` wrote")
    run_cfg.paths.output_dir = str(run_dir)
    if iwae_samples is not None:
        run_cfg.model.iwae_samples = iwae_samples
    run_cfg.model.iwae_examples = None  # the commands score every example
    datamodule = instantiate(run_cfg.data)
    ae = autoencoder(run_cfg, ckpt.get("autoenc_shape") or datamodule.shape)
    prefix = "autoencoder."  # the LightningModule's name for it, in checkpoints
    restore(ae, {"state_dict": {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}}, path)
    if type(datamodule).__qualname__ in ckpt:
        datamodule.load_state_dict(ckpt[type(datamodule).__qualname__])
    return Run(run_dir, run_cfg, datamodule, ae.eval().to(on or device()))
