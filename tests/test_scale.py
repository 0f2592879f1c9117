"""Scaling up on the CPU: DDP over 2 processes, multirun sweeps, an Optuna search, the SLURM launcher config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import FAST, ROOT, autoenc, tb_hparams, tb_scalar_series, tb_scalars, train_here

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "eval.iwae_samples=4"]
# Whole batches only (5 train, 1 val, 2 test per epoch), so both runs see exactly the same examples.
LIMITS = ["trainer.limit_train_batches=5", "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", *QUIET]


def hparams_entry(run_dir: Path) -> tuple[dict, set[str], dict[str, float]]:
    """What TensorBoard's HParams dashboard reads for a run: its hparams, metric tags (its scalar tags:
    there is no Experiment entry), metric values (each tag's last)."""
    hparams = {k: getattr(v, v.WhichOneof("kind")) for e in tb_hparams(run_dir) if e.HasField("session_start_info")
               for k, v in e.session_start_info.hparams.items()}
    series = tb_scalar_series(run_dir)
    return hparams, set(series), {t: points[-1][1] for t, points in series.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", [
    ["model=ae"], ["bottleneck=relu", "penalty=l1"], ["bottleneck=sigmoid", "penalty=kl"],
    # SGD for top-k: standardized, its code ignores the encoder head's bias, whose gradient is then float noise
    # that Adam would scale up to full steps, differently on each path
    ["bottleneck=topk", "penalty=contractive", "net=mlp_shallow", "model.optimizer._target_=torch.optim.SGD"],
    ["bottleneck=sigmoid", "penalty=contractive", "penalty.method=exact"],
    # VQ on a grid: k-means start and revived codes from the global batch, EMA counts summed over ranks
    ["net=conv", "net.latent=grid", "bottleneck=vq", "bottleneck.codes=16", "bottleneck.dead_after=2"],
], ids=lambda f: " ".join(f))
def test_ddp_on_two_processes_equals_one_process_with_the_same_global_batch(tmp_path, family):
    """Each rank takes its half of every global batch; KL sparsity's rate is the global batch's (an
    all-reduce): the training is that of one process, up to float summation order."""
    ddp, family = tmp_path / "ddp", ["trainer.max_epochs=2", *family]
    autoenc("train", f"hydra.run.dir={ddp}", "trainer=ddp_cpu", "data.batch_size=32", *LIMITS, *family)
    one = train_here(tmp_path / "one", "trainer=cpu", "data.batch_size=64", *LIMITS, *family, fast=False)
    two = json.loads((ddp / "results.json").read_text())
    assert two.keys() == one.keys() >= {"val/loss", "test/loss", "test/mse"}
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-4), k
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for d in (ddp, tmp_path / "one"))
    assert a["global_step"] == b["global_step"] == 10
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-4, atol=1e-6)
    # the epoch means of the training terms are the global batch's, not rank 0's half
    epoch_ddp, epoch_one = (tb_scalars(d, "loss/train_epoch") for d in (ddp, tmp_path / "one"))
    assert [s for s, _ in epoch_ddp] == [s for s, _ in epoch_one] and len(epoch_one) == 2
    assert [v for _, v in epoch_ddp] == pytest.approx([v for _, v in epoch_one], rel=1e-4)
    # The second rank ran this job again (Lightning's launcher) inside the same run directory.
    assert (ddp / "train_ddp_process_1.log").is_file() and not (ROOT / "outputs" / "ddp").exists()


@pytest.mark.slow
def test_ddp_of_a_stochastic_family_draws_per_rank_and_trains_alike(tmp_path):
    """A VAE with masking noise: each rank draws its own shard's noise and samples, so the run equals one
    process in distribution, not draw for draw."""
    family = ["model=vae", "noise=masking", "trainer.max_epochs=3", "trainer.limit_train_batches=20",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", *QUIET]
    autoenc("train", f"hydra.run.dir={tmp_path / 'ddp'}", "trainer=ddp_cpu", "data.batch_size=32", *family)
    one = train_here(tmp_path / "one", "trainer=cpu", "data.batch_size=64", *family, fast=False)
    two = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert two.keys() == one.keys() >= {"test/nelbo", "test/kl", "test/psnr_denoised"}
    assert two["test/nelbo"] != one["test/nelbo"]  # other draws…
    assert two["test/nelbo"] == pytest.approx(one["test/nelbo"], rel=0.05)  # …the same training


@pytest.mark.slow
def test_ddp_multirun_keeps_each_run_and_its_hparams_when_one_fails(tmp_path):
    sweep = tmp_path / "sweep"
    proc = autoenc("train", "-m", f"hydra.sweep.dir={sweep}", "model.latent_dim=2,3,0", "trainer=ddp_cpu",
                   "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                   "trainer.limit_test_batches=1", *QUIET, check=False)
    assert proc.returncode == 1  # after every job ran: the sweep did not succeed as a whole
    assert proc.stderr.strip().splitlines()[-1] == "autoenc: error: 1 of 3 jobs failed (#2); see error.txt in each"
    for job, dim in (("0", 2), ("1", 3)):
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # each job started its own second rank
        results = json.loads((sweep / job / "results.json").read_text())
        hparams, tags, values = hparams_entry(sweep / job)
        assert hparams["model.latent_dim"] == dim and hparams["choice/model"] == "ae"
        assert {"loss/val", "test/loss", "test/mse"} <= tags
        assert values["test/loss"] == pytest.approx(results["test/loss"], rel=1e-6)
        assert f"#{job} model.latent_dim={dim}: val/loss={results['val/loss']}" in proc.stdout
    error = (sweep / "2" / "error.txt").read_text()
    assert "model.latent_dim=0 is invalid" in error and not (sweep / "2" / "results.json").exists()
    assert f"#2 model.latent_dim=0: FAILED: {error.strip()}" in proc.stdout


@pytest.mark.slow
def test_optuna_search_runs_trials_and_saves_the_best(tmp_path):
    sweep = tmp_path / "search"
    proc = autoenc("train", "-m", "hparams_search=sparse", "hydra.sweeper.n_trials=3",
                   f"hydra.sweep.dir={sweep}", *FAST)
    trials = {}
    for job in ("0", "1", "2"):
        overrides = OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        chosen = {o.split("=")[0]: o.split("=")[1] for o in overrides if o.split("=")[0].startswith(("model.", "data."))}
        trials[job] = chosen, json.loads((sweep / job / "results.json").read_text())["val/loss"]
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    chosen, value = min(trials.values(), key=lambda t: t[1])
    assert best.best_value == pytest.approx(value, rel=1e-6)
    assert {k: str(v) for k, v in best.best_params.items()} == chosen
    assert set(chosen) == {"model.latent_dim", "model.optimizer.lr", "data.batch_size"}
    assert f"best trial ({sweep / 'optimization_results.yaml'}): val/loss={best.best_value}" in proc.stdout


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs" / "hparams_search").glob("*.yaml")))
def test_every_search_config_composes_an_optuna_sweep_of_its_model(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", [f"hparams_search={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.runtime.choices.model == name
    assert cfg.optimized_metric == "val/loss" and cfg.hydra.sweeper.params


def test_slurm_launcher_follows_the_trainer_devices_and_nodes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    shown = autoenc("train", "hydra/launcher=slurm", "--cfg", "hydra").stdout
    assert "SlurmLauncher" in shown and "tasks_per_node: ${trainer.devices}" in shown
