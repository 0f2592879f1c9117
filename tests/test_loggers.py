"""The mlflow and wandb loggers: each run's params, config, curves and results, read back from their stores."""

from __future__ import annotations

import json
import os
import sys

import pytest
from omegaconf import OmegaConf

from conftest import FAST, ROOT, autoenc, cli_error, tb_tags, train_here


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    """A CLI run logged to TensorBoard and to the default MLflow store (a SQLite file in the run directory)."""
    pytest.importorskip("mlflow")
    run_dir, cwd = tmp_path_factory.mktemp("mlflow") / "run", tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        autoenc("train", f"hydra.run.dir={run_dir}", *FAST, "logger=[tensorboard,mlflow]", "model.latent_dim=5",
                "trainer.max_epochs=3", "trainer.limit_val_batches=1.0", "trainer.log_every_n_steps=1", cwd=cwd)
    assert not list(cwd.iterdir())  # nothing (./mlruns, ./mlartifacts) outside the run directory
    results = json.loads((run_dir / "results.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("autoenc").experiment_id])
    assert len(runs) == 1
    return run_dir, results, client, runs[0]


def test_mlflow_run_has_the_hparams_as_params(mlflow_run):
    _, _, _, run = mlflow_run
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.latent_dim"] == "5"
    assert params["choice/model"] == "ae" and params["choice/data"] == "digits" and params["choice/net"] == "mlp"
    assert {k.split(".")[0].split("/")[0] for k in params} <= {"choice", "model", "net", "data", "noise",
                                                               "bottleneck", "penalty", "likelihood"}


def test_mlflow_metrics_hold_results_json_and_the_curves(mlflow_run):
    _, results, client, run = mlflow_run
    metrics = run.data.metrics
    assert metrics["test/loss"] == pytest.approx(results["test/loss"], rel=1e-6)
    for key, value in results.items():
        assert metrics[f"results/{key}"] == pytest.approx(value, rel=1e-12)
    curves = ("train/loss_epoch", "val/loss", "train/loss_step")
    history = {k: client.get_metric_history(run.info.run_id, k) for k in curves}
    assert len(history["train/loss_epoch"]) == 3
    assert [m.step for m in history["val/loss"]] == sorted(m.step for m in history["val/loss"])
    assert len(history["val/loss"]) == 3 and len(history["train/loss_step"]) >= 3 * 3
    assert min(m.value for m in history["val/loss"]) == pytest.approx(results["val/loss"], rel=1e-6)


def test_mlflow_artifact_is_the_resolved_config_kept_in_the_run_directory(mlflow_run):
    run_dir, _, client, run = mlflow_run
    assert client.get_experiment(run.info.experiment_id).artifact_location.endswith(str(run_dir / "mlflow-artifacts"))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    saved = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml", str(run_dir.parent)))
    assert saved.model.latent_dim == 5 and saved.paths.output_dir == str(run_dir)
    assert run.data.tags["run_dir"] == str(run_dir)
    assert list((run_dir / "mlflow-artifacts").glob("*/artifacts/config.yaml"))
    assert "loss/train_epoch" in tb_tags(run_dir)["scalars"]  # TensorBoard beside it, as before


def test_wandb_offline_run_holds_the_config_and_results_as_summary(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from wandb.sdk.wandb_run import Run

    seen = {}
    finish = Run.finish

    def recording_finish(self, *args, **kwargs):
        seen.update(summary=dict(self.summary), config=dict(self.config), dir=self.dir)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(Run, "finish", recording_finish)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    results = train_here(run_dir, "logger=wandb", "model.latent_dim=6", "trainer.max_epochs=2")
    assert wandb.run is None  # finished: the next run in this process is a new one
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and str(offline[0]) in seen["dir"]
    assert list(offline[0].glob("*.wandb"))[0].stat().st_size > 0
    assert seen["config"]["model.latent_dim"] == 6 and seen["config"]["config"]["model"]["latent_dim"] == 6
    for key, value in results.items():
        assert seen["summary"][key] == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("logger", ["mlflow", "wandb"])
def test_logger_whose_package_is_missing_is_one_line_error(logger, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, logger, None)  # `import mlflow` now fails, as where it is not installed
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path / 'run'}", f"logger={logger}", *FAST)
    assert line == f'autoenc: error: logger={logger} needs the {logger} package: pip install "autoenc[{logger}]"'
    assert not (tmp_path / "run").exists()
