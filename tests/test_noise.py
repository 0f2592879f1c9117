"""Corruptions: statistics match their parameters, seeds reproduce them, and training denoises."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from autoenc.model.noise import gaussian, masking, salt_pepper
from autoenc.data.module import to_unit
from autoenc.util.paths import CONFIGS
from autoenc.training.runs import build

X = torch.full((64, 1, 50, 50), 0.5)  # 160,000 pixels: a fraction's standard error is ≈ 0.001


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_masking_sets_a_fraction_p_of_pixels_to_zero():
    x_tilde = masking(X, seeded(), p=0.3)
    assert (x_tilde == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert ((x_tilde == 0) | (x_tilde == X)).all()


def test_gaussian_has_std_sigma_before_clipping_and_stays_in_unit_range():
    diff = gaussian(X, seeded(), std=0.05) - X  # 10σ from either bound: clipping never acts
    assert diff.mean().item() == pytest.approx(0.0, abs=0.001)
    assert diff.std().item() == pytest.approx(0.05, rel=0.01)
    wide = gaussian(X, seeded(), std=1.0)
    assert wide.min().item() == 0.0 and wide.max().item() == 1.0


def test_salt_pepper_hits_a_fraction_p_split_evenly_between_zero_and_one():
    x_tilde = salt_pepper(X, seeded(), p=0.2)
    hit = x_tilde != 0.5
    assert hit.float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert (x_tilde[hit] == 1).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert ((x_tilde[hit] == 0) | (x_tilde[hit] == 1)).all()


@pytest.mark.parametrize("noise", [gaussian, masking, salt_pepper])
def test_the_same_seed_reproduces_the_same_noise_and_another_seed_does_not(noise):
    x = torch.rand(8, 1, 8, 8, generator=seeded(5))
    assert torch.equal(noise(x, seeded(1)), noise(x, seeded(1)))
    assert not torch.equal(noise(x, seeded(1)), noise(x, seeded(2)))
    assert noise(x, seeded(1)).dtype == x.dtype and torch.equal(x, torch.rand(8, 1, 8, 8, generator=seeded(5)))


def test_training_reconstructs_the_clean_input_not_the_noisy_one():
    """Two hundred steps of the configured denoising model: outputs end nearer x than x̃."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["model=denoising", "noise=masking", "noise.p=0.5",
                                          "net.hidden=[64]", "paths.output_dir=unused"])
    torch.manual_seed(0)
    datamodule, model, _ = build(cfg)
    x_train, x_val = (to_unit(datamodule.splits[k][0]) for k in ("train", "val"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = seeded(0)
    for step in range(200):
        x = x_train[torch.randint(len(x_train), (128,), generator=g)]
        loss = model.autoencoder(x, model.autoencoder.noise(x, g)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    x_tilde = model.autoencoder.noise(x_val, seeded(9))
    with torch.no_grad():
        x_hat = model(x_tilde)
    to_clean, to_noisy = ((x_hat - x_val) ** 2).mean(), ((x_hat - x_tilde) ** 2).mean()
    assert to_clean < 0.6 * to_noisy
    assert to_clean < ((x_tilde - x_val) ** 2).mean()  # and it removes noise: better than x̃ itself
