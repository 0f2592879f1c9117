"""The top-k sparse autoencoder of Gao et al. (2024): unit-norm decoder columns, tied initialization, AuxK
bringing dead units back, and the fraction of variance unexplained."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from autoenc.training.runs import build
from conftest import compose, rebuilt, train_here

SAE = ["net=sae", "bottleneck=topk", "bottleneck.k=2", "likelihood=mse", "model.latent_dim=16", "data.batch_size=32",
       "model.scheduler=null"]


def decoder_weight(model) -> torch.Tensor:
    return model.autoencoder.decoder[0].weight  # (pixels, units): the parametrization gives unit columns


def test_decoder_columns_have_unit_norm_after_a_step_and_the_encoder_starts_as_its_transpose():
    torch.manual_seed(0)
    _, model, _ = build(compose(*SAE))
    assert torch.allclose(model.autoencoder.encoder[2].weight, decoder_weight(model).t())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = torch.rand(32, 1, 8, 8)
    model.autoencoder(x, x).loss.backward()
    opt.step()
    norms = decoder_weight(model).norm(dim=0)
    assert torch.allclose(norms, torch.ones(16), atol=1e-5)
    assert not torch.allclose(model.autoencoder.encoder[2].weight, decoder_weight(model).t())  # they train apart


def fit_with_unit_0_killed(aux_coef: float, steps: int = 400, net: str = "sae", standardize: float = 0.0):
    """Trains after silencing unit 0 (its row of the encoder's last layer zero, its bias below zero: never
    among the top 2, so without help it gets no gradient); returns how often it fires on the test set, and
    the model."""
    torch.manual_seed(0)
    cfg = compose(*SAE, f"net={net}", f"bottleneck.aux_coef={aux_coef}", "bottleneck.dead_window=30",
                  f"bottleneck.standardize={standardize}", fast=False)
    datamodule, model, _ = build(cfg)
    head = [m for m in model.autoencoder.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight[0], head.bias[0] = 0.0, -0.1
    pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0).fit(model, datamodule=datamodule)
    with torch.no_grad():
        code = model.autoencoder.encode(datamodule.transform(datamodule.splits["test"][0])).code
    return (code[:, 0] > 0).float().mean().item(), model


@pytest.mark.parametrize("net", ["sae", "mlp"])
def test_auxk_brings_a_dead_unit_back_and_without_it_the_unit_stays_dead(net):
    revived, model = fit_with_unit_0_killed(1 / 32, net=net)
    stays, _ = fit_with_unit_0_killed(0.0, net=net)
    assert stays == 0.0
    assert revived > 0.0 and model.autoencoder.bottleneck.since_fired[0] < 30


def test_standardized_top_k_brings_a_killed_unit_back_on_an_mlp_without_auxk():
    revived, _ = fit_with_unit_0_killed(0.0, net="mlp", standardize=0.1)
    assert revived > 0.05


def test_fvu_equals_an_independent_computation(tmp_path):
    results = train_here(tmp_path, *SAE, "trainer.limit_test_batches=1.0")
    datamodule, model = rebuilt(tmp_path)
    x = datamodule.splits["test"][0].flatten(1).double().numpy()
    with torch.no_grad():
        x_hat = model(datamodule.splits["test"][0]).flatten(1).double().numpy()
    expected = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert results["test/fvu"] == pytest.approx(expected, rel=1e-4)
    assert results["test/l0"] <= 2
