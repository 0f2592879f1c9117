"""Using trained models: evaluate against PCA and probes, pictures, latent codes, comparing runs, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, autoenc, train_run

# 615 steps of batch 32 at lr 3e-3: enough for an 8-d code to beat PCA-8 on digits (≈0.019 vs 0.024).
AE = ["trainer.max_epochs=15", "trainer.limit_train_batches=1.0", "trainer.limit_val_batches=1.0",
      "trainer.limit_test_batches=1.0", "data.batch_size=32", "model.optimizer.lr=3e-3", "model.latent_dim=8"]


@pytest.fixture(scope="module")
def ae(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("use") / "ae"
    results = train_run(run_dir, *AE)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    out = autoenc("evaluate", f"ckpt={ckpt}").stdout
    return ckpt, results, json.loads((run_dir / "evaluation.json").read_text()), out


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("use") / "vae"
    train_run(run_dir, "model=vae", "model.latent_dim=4", "trainer.max_epochs=2")
    return run_dir / "checkpoints" / "best.ckpt"


def use(command: str, *overrides: str):
    """Runs a command in-process on the composed `use` config (the CLI's own path is tested separately)."""
    from hydra import compose, initialize_config_dir

    from autoenc import use as commands
    from autoenc.cli import CONFIGS

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return getattr(commands, command)(compose("use", overrides=list(overrides)))


def rebuilt(ckpt):
    """The run's data module and model, rebuilt independently of autoenc.use."""
    from autoenc.train import build

    cfg = OmegaConf.load(ckpt.parent.parent / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(ckpt.parent.parent)
    datamodule, model = build(cfg)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    return datamodule, model.eval()


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def grid_px(cols: int, rows: int, side: int = 8, pad: int = 2) -> tuple[int, int]:
    """make_grid's (width, height) for 8×8 images with its default 2-pixel padding."""
    return cols * (side + pad) + pad, rows * (side + pad) + pad


def test_evaluate_pca_mse_equals_an_independent_svd_reconstruction(ae):
    ckpt, _, figures, out = ae
    datamodule, _ = rebuilt(ckpt)
    a, b = (datamodule.splits[s][0].flatten(1).double().numpy() for s in ("train", "test"))
    mu = a.mean(0)
    v = np.linalg.svd(a - mu, full_matrices=False)[2][:8]
    expected = ((((b - mu) @ v.T) @ v + mu - b) ** 2).mean()
    assert figures["pca_components"] == 8
    assert figures["pca_mse"] == pytest.approx(expected, rel=1e-6)
    assert f"wrote {ckpt.parent.parent / 'evaluation.json'}" in out and "pca_mse" in out


def test_trained_ae_beats_pca_and_its_codes_carry_the_labels(ae):
    ckpt, results, figures, _ = ae
    assert figures["mse"] < figures["pca_mse"]
    assert figures["mse"] == pytest.approx(results["test/mse"], rel=1e-4)  # whole test set both times
    datamodule, model = rebuilt(ckpt)
    x = datamodule.splits["test"][0]
    with torch.no_grad():
        per_image = (model(x) - x).flatten(1).pow(2).mean(1)
    assert figures["psnr"] == pytest.approx((-10 * per_image.log10()).mean().item(), rel=1e-4)
    assert figures["probe_accuracy"] > 0.5  # chance is 0.1
    assert figures["probe_accuracy_pixels"] > 0.9


def test_evaluate_vae_reports_elbo_iwae_and_active_units(vae, tmp_path):
    autoenc("evaluate", f"ckpt={vae}", "eval.iwae_samples=16", f"out={tmp_path / 'e.json'}")
    figures = json.loads((tmp_path / "e.json").read_text())
    assert {"nelbo", "nll_iwae", "kl", "active_units", "pca_mse", "probe_accuracy"} <= figures.keys()
    assert 0 <= figures["active_units"] <= 4
    assert figures["nll_iwae"] < figures["nelbo"] + 1.0  # IWAE-16 bounds log p(x) at least as tightly


def test_sample_writes_a_square_grid(vae, tmp_path):
    path = use("sample", f"ckpt={vae}", "n=16", f"out={tmp_path / 's.png'}")
    assert png_size(path) == grid_px(4, 4)


def test_sample_refuses_a_model_without_a_prior(ae):
    from autoenc.errors import UserError  # the CLI prints it as one line (see the truncated-checkpoint test)

    with pytest.raises(UserError, match=r"^bottleneck=linear has no prior to sample from; .* \(model=vae\)"):
        use("sample", f"ckpt={ae[0]}")


def test_reconstruct_grid_of_a_split_and_of_an_image_folder(ae, tmp_path):
    ckpt = ae[0]
    path = use("reconstruct", f"ckpt={ckpt}", "n=16", f"out={tmp_path / 'r.png'}")
    assert png_size(path) == grid_px(8, 4)  # two chunks of 8, each an input row and a reconstruction row
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30), 60 * i, np.uint8)).save(folder / f"{i}.png")
    path = use("reconstruct", f"ckpt={ckpt}", f"input={folder}", f"out={tmp_path / 'f.png'}")
    assert png_size(path) == grid_px(3, 2)


def test_denoise_uses_the_chosen_noise_and_refuses_without_one(ae, tmp_path):
    from autoenc.errors import UserError

    path = use("denoise", f"ckpt={ae[0]}", "noise=masking", "noise.p=0.5", "n=8", f"out={tmp_path / 'd.png'}")
    assert png_size(path) == grid_px(8, 3)
    with Image.open(path) as im:
        grid = np.asarray(im.convert("L"))
    clean, masked = grid[2:10, 2:82], grid[12:20, 2:82]  # rows 1 and 2: clean and masked inputs
    assert (masked == 0).mean() > (clean == 0).mean() + 0.15
    with pytest.raises(UserError, match="trained without noise; choose one"):
        use("denoise", f"ckpt={ae[0]}")


def test_encode_codes_decode_to_the_models_reconstructions(ae, tmp_path):
    path = use("encode", f"ckpt={ae[0]}", f"out={tmp_path / 'latents.npz'}")
    data = np.load(path)
    datamodule, model = rebuilt(ae[0])
    x, y = datamodule.splits["test"]
    assert data["code"].shape == (len(x), 8) and (data["label"] == y.numpy()).all()
    with torch.no_grad():
        decoded = torch.sigmoid(model.decoder(torch.from_numpy(data["code"])))
        assert torch.allclose(decoded, model(x), atol=1e-5)


def test_interpolate_paths_and_vae_traversal(vae, tmp_path):
    path = use("interpolate", f"ckpt={vae}", "pairs=3", "steps=5", f"out={tmp_path / 'i.png'}")
    assert png_size(path) == grid_px(7, 3)  # image a, 5 decoded points, image b
    assert png_size(tmp_path / "i_traversal.png") == grid_px(5, 4)  # one row per latent dimension


@pytest.mark.slow
def test_compare_tabulates_every_run_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    autoenc("train", "-m", "model.latent_dim=2,4", f"hydra.sweep.dir={sweep}", *FAST)
    out = autoenc("compare", f"runs=[{sweep}]", "sort=mse", "metrics=[mse,loss]").stdout
    assert "| run | model.latent_dim | mse | loss |" in out
    with open(sweep / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model.latent_dim"] for r in rows) == ["2", "4"]
    assert float(rows[0]["mse"]) <= float(rows[1]["mse"])
    assert png_size(sweep / "comparison.png")[0] > 0


def test_truncated_checkpoint_is_a_one_line_error(ae, tmp_path):
    broken = tmp_path / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir()
    data = ae[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    proc = autoenc("evaluate", f"ckpt={broken}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "truncated or not a checkpoint" in proc.stderr
