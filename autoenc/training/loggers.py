"""Lightning's experiment loggers, each able to record a finished run's config and results (`log_run`)."""

from __future__ import annotations

import importlib
import logging

from lightning.pytorch import loggers
from omegaconf import OmegaConf

from autoenc.util.errors import UserError


def log_run(run_loggers, hparams: dict, cfg, results: dict) -> None:
    """Hands each logger that can record a run its flattened hparams, full resolved config and results."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in run_loggers:
        if hasattr(lg, "log_run"):  # Lightning's own classes (csv) record nothing more, as before
            lg.log_run(hparams, config, results, trial_name(cfg))


def trial_name(cfg) -> str:
    """A run's name in a comparison: its directory (the sweep's time and job number) and its overrides."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    out = Path(cfg.paths.output_dir).absolute()
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return " ".join([f"{out.parent.name}/{out.name}", *overrides])


def require(module: str, logger: str) -> None:
    """Refuses a logger whose package is not installed, in one line naming the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f'logger={logger} needs the {module} package: pip install "autoenc[{logger}]"') from None


class TensorBoardLogger(loggers.TensorBoardLogger):
    """TensorBoard laid out for a first look: the loss curves lead (group `loss`), no `epoch` card, the test
    figures also as a text table, HParams columns computed across the runs (those that vary come first)."""

    TAGS = {"train/loss_step": "loss/train", "train/loss_epoch": "loss/train_epoch", "val/loss": "loss/val"}

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics({self.TAGS.get(k, k): v for k, v in metrics.items() if k != "epoch"}, step)

    def log_run(self, hparams: dict, config: dict, results: dict, trial: str = "") -> None:
        from tensorboard.plugins.hparams import plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        # Only the session's start and end: an Experiment entry (torch's third summary) would fix the columns
        # of every run in the log directory to this run's, and hide which hparams differ between runs.
        _, start, end = hparams_summaries(hparams, {})
        data = plugin_data_pb2.HParamsPluginData.FromString(start.value[0].metadata.plugin_data.content)
        data.session_start_info.group_name = trial  # HParams' trial name
        start.value[0].metadata.plugin_data.content = data.SerializeToString()
        # Private, as SummaryWriter has no public way to write a prepared summary (this also reopens the
        # writer that the test's finalize closed).
        writer = self.experiment._get_file_writer()
        writer.add_summary(start)
        writer.add_summary(end)
        rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in sorted(results.items()))
        self.experiment.add_text("results", f"{trial}\n\n| results.json | value |\n|---|---|\n{rows}")
        self.hparams.update(hparams)
        self.save()  # hparams.yaml
        self.experiment.flush()  # after the test's finalize: its writer is new and would flush only later


class MLFlowLogger(loggers.MLFlowLogger):
    """MLflow; a run records the hparams as params, the config as config.yaml and results.json as results/*."""

    def __init__(self, **kwargs):
        require("mlflow", "mlflow")
        for name in ("mlflow", "alembic", "lightning.pytorch.loggers.mlflow"):  # table set-up, "creating it"
            logging.getLogger(name).setLevel(logging.ERROR)
        super().__init__(**kwargs)

    def log_run(self, hparams: dict, config: dict, results: dict, trial: str = "") -> None:
        self.log_hyperparams(hparams)
        self.experiment.log_text(self.run_id, OmegaConf.to_yaml(config), "config.yaml")
        # Prefixed: results.json's val/loss is the best score, which must not become the val/loss curve's last point.
        self.log_metrics({f"results/{k}": v for k, v in results.items()})


class WandbLogger(loggers.WandbLogger):
    """Weights & Biases; a run records hparams and config, results.json as its summary, and then finishes."""

    def __init__(self, **kwargs):
        require("wandb", "wandb")
        super().__init__(**kwargs)

    def log_run(self, hparams: dict, config: dict, results: dict, trial: str = "") -> None:
        self.log_hyperparams({**hparams, "config": config})
        self.experiment.summary.update(results)
        self.experiment.finish()  # else the next run of a sweep, in this process, would reuse this one
