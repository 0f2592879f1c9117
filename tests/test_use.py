"""Using trained models: evaluate against PCA and probes, pictures (by content), codes in order, decode, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from autoenc.util.errors import UserError
from conftest import autoenc, rebuilt, train_run

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
    """Runs a command in-process on its composed config (the CLI's own path is tested separately)."""
    from hydra import compose, initialize_config_dir

    from autoenc.app import commands as commands
    from autoenc.util.paths import CONFIGS

    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return getattr(commands, command)(compose(f"command/{command}", overrides=list(overrides)))


def run_of(ckpt):
    return rebuilt(ckpt.parent.parent, ckpt.name)


def tiles(path, rows: int, cols: int, side: int = 8, title: bool = False) -> np.ndarray:
    """The images of a picture written by a command, (rows, cols, H, W) grey in [0, 1]: the grid sits at
    the picture's right edge (labels are on the left), tiles upscaled to ≥ 64 px with 2-px gaps."""
    t = side * math.ceil(64 / side)
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255
    grid = img[img.shape[0] - (rows * (t + 2) + 2):, img.shape[1] - (cols * (t + 2) + 2):]
    return np.stack([np.stack([grid[2 + r * (t + 2):2 + r * (t + 2) + t:t // side, 2 + c * (t + 2):2 + c * (t + 2) + t:t // side]
                               for c in range(cols)]) for r in range(rows)])


def svd_pca_mse(datamodule, components: int) -> float:
    """Test MSE of PCA with `components` fitted on the training split, by an SVD."""
    a, b = (datamodule.splits[s][0].flatten(1).double().numpy() for s in ("train", "test"))
    mu = a.mean(0)
    v = np.linalg.svd(a - mu, full_matrices=False)[2][:components]
    return float(((((b - mu) @ v.T) @ v + mu - b) ** 2).mean())


def test_evaluate_pca_mse_equals_an_independent_svd_reconstruction(ae):
    ckpt, _, figures, out = ae
    datamodule, _ = run_of(ckpt)
    assert figures["pca_components"] == 8
    assert figures["pca_mse"] == pytest.approx(svd_pca_mse(datamodule, 8), rel=1e-6)
    assert f"wrote {ckpt.parent.parent / 'evaluation.json'}" in out and "pca_mse" in out


def test_trained_ae_beats_pca_and_its_codes_carry_the_labels(ae):
    ckpt, results, figures, _ = ae
    assert figures["mse"] < figures["pca_mse"]
    assert figures["mse"] == pytest.approx(results["test/mse"], rel=1e-4)  # whole test set both times
    datamodule, model = run_of(ckpt)
    x = datamodule.splits["test"][0]
    with torch.no_grad():
        per_image = (model(x) - x).flatten(1).pow(2).mean(1)
    assert figures["psnr"] == pytest.approx((-10 * per_image.log10()).mean().item(), rel=1e-4)
    assert figures["probe_accuracy"] > 0.5  # chance is 0.1
    assert figures["probe_accuracy_pixels"] > 0.9


def test_evaluate_twice_writes_identical_figures(ae, tmp_path):
    again = use("evaluate", f"ckpt={ae[0]}", f"out={tmp_path / 'again.json'}")
    assert again == ae[2]


def test_evaluate_vae_iwae_and_active_units_equal_independent_estimates(vae, tmp_path):
    figures = use("evaluate", f"ckpt={vae}", "eval.iwae_samples=64", f"out={tmp_path / 'e.json'}")
    datamodule, model = run_of(vae)
    x = datamodule.splits["test"][0]
    with torch.no_grad():
        mean, logvar = model.autoencoder.encoder(x).chunk(2, 1)
        q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
        z = q.sample((64,))  # (K, N, d): the importance-weighted bound, written out independently
        log_px = torch.distributions.Bernoulli(logits=model.autoencoder.decoder(z.flatten(0, 1)), validate_args=False).log_prob(x.repeat(64, 1, 1, 1))
        log_w = (log_px.flatten(1).sum(1).view(64, -1) + torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                 - q.log_prob(z).sum(-1))
        nll = -(torch.logsumexp(log_w, 0) - math.log(64))
    assert figures["nll_iwae"] == pytest.approx(nll.mean().item(), abs=5 * (nll.std() / len(nll) ** 0.5).item())
    assert figures["nll_iwae"] < figures["nelbo"]
    assert figures["active_units"] == (mean.var(0, unbiased=False) > 0.01).sum().item()
    active = int(figures["active_units"])  # PCA with as many components as units carry information
    expected = svd_pca_mse(datamodule, active) if 0 < active < 4 else None
    assert figures.get("pca_mse_active_units") == (expected and pytest.approx(expected, rel=1e-6))


def test_sample_draws_different_images_upscaled(vae):
    path = use("sample", f"ckpt={vae}", "n=16")
    assert path.parent.name == "commands" and path.name == "sample_n16_seed0.png"
    assert Image.open(path).size == (4 * 66 + 2, 4 * 66 + 2)  # 8×8 digits at 64 px, 2-px gaps
    t = tiles(path, 4, 4)
    assert np.abs(t[0, 0] - t[0, 1]).max() > 0.05


def test_sample_refuses_a_model_without_a_prior(ae):
    with pytest.raises(UserError, match=r"^bottleneck=linear has no prior to sample from; .* \(model=vae\)"):
        use("sample", f"ckpt={ae[0]}")


def test_reconstruction_rows_resemble_their_input_rows(ae):
    path = use("reconstruct", f"ckpt={ae[0]}", "n=16")
    assert path.name == "reconstruct_test.png"
    t = tiles(path, 4, 8)  # two chunks of 8: input row, reconstruction row
    for inputs, recons in ((t[0], t[1]), (t[2], t[3])):
        own = np.abs(inputs - recons).mean()
        shuffled = np.abs(inputs - np.roll(recons, 1, axis=0)).mean()
        assert own < 0.6 * shuffled


def test_denoise_uses_the_chosen_noise_and_refuses_without_one(ae):
    path = use("denoise", f"ckpt={ae[0]}", "noise=masking", "noise.p=0.5", "n=8")
    assert path.name == "denoise_test_p0.5.png"
    clean, masked, denoised = tiles(path, 3, 8)
    assert (masked == 0).mean() > (clean == 0).mean() + 0.15
    assert np.abs(denoised - clean).mean() < np.abs(masked - clean).mean()
    with pytest.raises(UserError, match="trained without noise; choose one"):
        use("denoise", f"ckpt={ae[0]}")


def image_folder(root, n: int = 6):
    """Files 0.png … named out of alphabetical-vs-numeric order trouble, each a distinct constant grey."""
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.full((20, 30), 40 * i, np.uint8)).save(root / f"img_{i}.png")
    return root


def test_encode_of_a_folder_keeps_sorted_file_order_and_names_the_files(ae, tmp_path):
    folder = image_folder(tmp_path / "mine")
    data = np.load(use("encode", f"ckpt={ae[0]}", f"input={folder}"))
    assert [p.split("/")[-1] for p in data["path"]] == [f"img_{i}.png" for i in range(6)]
    datamodule, model = run_of(ae[0])
    grey = torch.tensor([40 * i / 255 for i in range(6)]).view(6, 1, 1, 1).expand(6, 1, 8, 8)
    with torch.no_grad():
        assert np.allclose(data["code"], model.autoencoder.encode(grey).code.numpy(), atol=1e-4)  # row i is file i


def test_decode_of_encode_is_the_models_reconstruction(ae, tmp_path):
    codes = use("encode", f"ckpt={ae[0]}", f"out={tmp_path / 'latents.npz'}")
    data = np.load(codes)
    datamodule, model = run_of(ae[0])
    x, y = datamodule.splits["test"]
    assert data["code"].shape == (len(x), 8) and (data["label"] == y.numpy()).all()
    assert (data["index"] == np.arange(len(x))).all()
    decoded = np.load(use("decode", f"ckpt={ae[0]}", f"codes={codes}", f"out={tmp_path / 'decoded.npz'}"))
    with torch.no_grad():
        assert np.allclose(decoded["x_hat"], model(x).numpy(), atol=1e-5)
    assert (decoded["label"] == y.numpy()).all() and (tmp_path / "decoded.png").is_file()
    np.save(tmp_path / "bare.npy", data["code"])  # a .npy of codes alone decodes the same
    bare = np.load(use("decode", f"ckpt={ae[0]}", f"codes={tmp_path / 'bare.npy'}", f"out={tmp_path / 'bare.npz'}"))
    assert np.array_equal(bare["x_hat"], decoded["x_hat"])


def test_decode_refuses_codes_of_another_size(ae, tmp_path):
    np.savez(tmp_path / "bad.npz", code=np.zeros((3, 5), np.float32))
    with pytest.raises(UserError, match=r"needs an array `code` of shape \(N, 8\); it has \(3, 5\)"):
        use("decode", f"ckpt={ae[0]}", f"codes={tmp_path / 'bad.npz'}")


def test_interpolation_paths_run_from_one_decoding_to_the_other_and_a_prior_adds_a_traversal(ae, vae):
    path = use("interpolate", f"ckpt={ae[0]}", "pairs=3", "steps=5")
    t = tiles(path, 3, 7)  # image a, 5 decoded points, image b
    for row in t:  # each path starts near a and ends near b
        assert np.abs(row[1] - row[0]).mean() < np.abs(row[1] - row[6]).mean()
        assert np.abs(row[5] - row[6]).mean() < np.abs(row[5] - row[0]).mean()
    assert not path.with_name(path.stem + "_traversal.png").exists()
    path = use("interpolate", f"ckpt={vae}", "pairs=3", "steps=5")
    assert Image.open(path.with_name(path.stem + "_traversal.png")).size[1] == 4 * 66 + 2  # one row per dimension


def test_truncated_checkpoint_is_a_one_line_error(ae, tmp_path):
    broken = tmp_path / "checkpoints" / "broken.ckpt"
    broken.parent.mkdir()
    data = ae[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    proc = autoenc("evaluate", f"ckpt={broken}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "truncated or not a checkpoint" in proc.stderr


def test_evaluate_fits_the_baselines_on_the_kind_of_data_it_scores(tmp_path, monkeypatch):
    """A dynamically binarized run is scored on binarized test images, so PCA and the probes are fitted on
    binarized training images; a top-k code is compared with PCA of k components."""
    from autoenc.model import metrics

    run = tmp_path / "run"
    train_run(run, "data.binarize=dynamic", "bottleneck=topk", "bottleneck.k=3", "model.latent_dim=16")
    seen = {}
    real = metrics.pca_mse

    def spy(train, test, components):
        seen.update(train=train, test=test, components=components)
        return real(train, test, components)

    monkeypatch.setattr(metrics, "pca_mse", spy)
    figures = use("evaluate", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", f"out={tmp_path / 'e.json'}")
    assert set(seen["train"].unique().tolist()) == {0.0, 1.0} and set(seen["test"].unique().tolist()) == {0.0, 1.0}
    assert seen["components"] == 3 and figures["pca_components"] == 3
