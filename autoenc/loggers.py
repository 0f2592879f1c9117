"""Lightning's experiment loggers, each able to record a finished run's config and results (`log_run`)."""

from __future__ import annotations

import importlib
import logging

from lightning.pytorch import loggers
from omegaconf import OmegaConf

from autoenc.errors import UserError


def log_run(run_loggers, hparams: dict, cfg, results: dict) -> None:
    """Hands each logger that can record a run its flattened hparams, full resolved config and results."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for lg in run_loggers:
        if hasattr(lg, "log_run"):  # Lightning's own classes (csv) record nothing more, as before
            lg.log_run(hparams, config, results)


def require(module: str, logger: str) -> None:
    """Refuses a logger whose package is not installed, in one line naming the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f'logger={logger} needs the {module} package: pip install "autoenc[{logger}]"') from None


class TensorBoardLogger(loggers.TensorBoardLogger):
    """TensorBoard; the run's hparams and results go to its HParams view."""

    def log_run(self, hparams: dict, config: dict, results: dict) -> None:
        self.log_hyperparams(hparams, metrics=results)
        self.experiment.flush()  # after the test's finalize: its writer is new and would flush only later


class MLFlowLogger(loggers.MLFlowLogger):
    """MLflow; a run records the hparams as params, the config as config.yaml and results.json as results/*."""

    def __init__(self, **kwargs):
        require("mlflow", "mlflow")
        for name in ("mlflow", "alembic", "lightning.pytorch.loggers.mlflow"):  # table set-up, "creating it"
            logging.getLogger(name).setLevel(logging.ERROR)
        super().__init__(**kwargs)

    def log_run(self, hparams: dict, config: dict, results: dict) -> None:
        self.log_hyperparams(hparams)
        self.experiment.log_text(self.run_id, OmegaConf.to_yaml(config), "config.yaml")
        # Prefixed: results.json's val/loss is the best score, which must not become the val/loss curve's last point.
        self.log_metrics({f"results/{k}": v for k, v in results.items()})


class WandbLogger(loggers.WandbLogger):
    """Weights & Biases; a run records hparams and config, results.json as its summary, and then finishes."""

    def __init__(self, **kwargs):
        require("wandb", "wandb")
        super().__init__(**kwargs)

    def log_run(self, hparams: dict, config: dict, results: dict) -> None:
        self.log_hyperparams({**hparams, "config": config})
        self.experiment.summary.update(results)
        self.experiment.finish()  # else the next run of a sweep, in this process, would reuse this one
