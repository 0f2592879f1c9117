"""The families' own figures and pictures, recomputed from their checkpoints: sparsity, denoising, contraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import FAST, cli_error, compose, rebuilt, tb_scalars, tb_tags, train_here


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple]:
    """name → (run dir, results) of a few family runs on the digits, trained in this process."""
    root = tmp_path_factory.mktemp("families")
    cases = {
        "sparse": ["model=sparse", "bottleneck=relu", "penalty=l1", "net=mlp", "model.latent_dim=128"],
        "masking": ["model=denoising", "noise=masking"],
        "gaussian_noise": ["model=denoising", "noise=gaussian", "trainer.limit_test_batches=1.0"],
        "ae": ["model=ae"],
        "analytic": ["model=contractive", "penalty.method=analytic", "model.latent_dim=32"],
        "exact": ["model=contractive", "penalty.method=exact", "model.latent_dim=32"],
    }
    return {name: (root / name, train_here(root / name, *overrides)) for name, overrides in cases.items()}


def test_sparse_run_writes_one_feature_tile_per_unit_and_a_frequency_histogram(runs):
    run_dir, results = runs["sparse"]
    # 128 units of 8×8 shown at 64 px in a 12-wide grid (2-px gaps) under a 22-px title; the units that
    # never fired on the last validation are framed in red, and come last (most often active first).
    img = np.asarray(Image.open(run_dir / "features.png").convert("RGB")).astype(int)
    assert img.shape == (22 + 11 * 66 + 2, 12 * 66 + 2, 3)
    corners = [img[22 + 2 + r * 66, 2 + c * 66] for r in range(11) for c in range(12)][:128]
    red = [bool(p[0] > 200 and p[1] < 60 and p[2] < 60) for p in corners]
    dead = round(dict(tb_scalars(run_dir, "val/dead_fraction"))[max(dict(tb_scalars(run_dir, "val/dead_fraction")))] * 128)
    assert sum(red) == dead and red == sorted(red)  # all the red tiles at the end
    tags = tb_tags(run_dir)
    assert "val/activation_frequency" in tags["histograms"]
    assert {"val/l0", "val/dead_fraction", "train/l0_step"} <= tags["scalars"]
    datamodule, model = rebuilt(run_dir)
    n = 2 * compose("model=sparse", "bottleneck=relu").data.batch_size  # the test's first examples (FAST: 2 batches)
    with torch.no_grad():
        code = model.autoencoder.encode(datamodule.splits["test"][0][:n]).code
    fires = (code > 0).float()
    assert results["test/l0"] == pytest.approx(fires.sum(1).mean().item(), rel=1e-5)


def tb_image_height(run_dir, tag: str) -> int:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for f in run_dir.glob("events.out.tfevents.*"):
        ea = EventAccumulator(str(f), size_guidance={"images": 0})
        ea.Reload()
        if tag in ea.Tags()["images"]:
            return ea.Images(tag)[-1].height
    raise AssertionError(f"no image {tag} in {run_dir}")


def test_denoising_image_has_clean_noisy_denoised_rows(runs):
    # 8×8 digits at 64 px, 2-pixel gaps: 3 rows (input, noisy, denoised) are 200 px high, the plain AE's 2 rows 134.
    assert tb_image_height(runs["masking"][0], "val/reconstructions") == 3 * 66 + 2
    assert tb_image_height(runs["ae"][0], "val/reconstructions") == 2 * 66 + 2


def test_psnr_equals_recomputation_from_the_best_checkpoint(runs):
    from autoenc.data.module import to_unit
    from autoenc.util.seeds import derive

    run_dir, results = runs["gaussian_noise"]
    datamodule, model = rebuilt(run_dir)
    cfg = compose("model=denoising", "noise=gaussian")
    g = torch.Generator().manual_seed(derive(cfg.model.noise_seed, "noise/test"))  # test noise restarts here
    noise = instantiate(cfg.noise)
    x = to_unit(datamodule.splits["test"][0])
    x_tilde = torch.cat([noise(b, g) for b in x.split(cfg.data.batch_size)])
    with torch.no_grad():
        x_hat = torch.sigmoid(model.autoencoder.decoder(model.autoencoder.encoder(x_tilde)))

    def mean_psnr(a):  # per image, then averaged over the test set
        return (10 * torch.log10(1 / ((a - x) ** 2).flatten(1).mean(1))).mean().item()

    assert results["test/psnr_noisy"] == pytest.approx(mean_psnr(x_tilde), rel=1e-4)
    assert results["test/psnr_denoised"] == pytest.approx(mean_psnr(x_hat), rel=1e-4)


def test_contractive_analytic_and_exact_runs_agree(runs):
    analytic, exact = runs["analytic"][1], runs["exact"][1]
    assert analytic["test/jacobian_fro"] > 0
    assert analytic["test/jacobian_fro"] == pytest.approx(exact["test/jacobian_fro"], rel=1e-4)
    assert analytic["test/loss"] == pytest.approx(exact["test/loss"], rel=1e-4)


def test_analytic_contractive_with_a_deep_encoder_is_a_one_line_error(tmp_path, capsys):
    line = cli_error(capsys, "train", f"hydra.run.dir={tmp_path}", *FAST, "model=contractive", "net=mlp",
                     "penalty.method=analytic")
    assert line == ("autoenc: error: penalty.method=analytic needs a one-layer encoder (net=mlp_shallow); "
                    "use penalty.method=exact or estimate")


@pytest.mark.parametrize("bottleneck, penalty", [("relu", "l1"), ("sigmoid", "kl")])
def test_a_sparsity_penalty_makes_codes_sparser_than_none_with_the_same_seed(tmp_path, bottleneck, penalty):
    budget = ["model.latent_dim=64", "trainer.max_epochs=3", "trainer.limit_train_batches=1.0", "trainer.limit_test_batches=1.0"]
    plain = train_here(tmp_path / "none", f"bottleneck={bottleneck}", "penalty=none", *budget)
    sparse = train_here(tmp_path / penalty, f"bottleneck={bottleneck}", f"penalty={penalty}", *budget)
    assert sparse["test/l0"] < 0.9 * plain["test/l0"]  # units active per example, at the default weights
