"""The Gaussian bottleneck in the pipeline (a VAE): ELBO and IWAE against independent estimates, the Gaussian
likelihood, prior samples, pictures, binarization and β warm-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from autoenc.model.bottlenecks import gaussian_kl
from autoenc.model.likelihoods import Gaussian
from autoenc.training.runs import build
from conftest import compose, rebuilt, tb_tags, train_here

RESULT_KEYS = {"test/nelbo", "test/recon", "test/kl", "test/mse", "test/active_units", "test/nll_iwae"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-D latent VAE on the digits, trained just long enough to use both latents."""
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    results = train_here(run_dir, "model=vae", "model.latent_dim=2", "net.hidden=[64]", "net.activation=Tanh",
                         "model.optimizer.lr=1e-2", "data.batch_size=32", "trainer.max_epochs=2",
                         "trainer.limit_train_batches=30", "trainer.limit_test_batches=1.0",
                         "trainer.log_every_n_steps=1")
    return run_dir, results


def load(run_dir):
    return rebuilt(run_dir)


@torch.no_grad()
def elbo_draws(model, x, draws: int) -> torch.Tensor:
    """(draws, B) single-draw ELBO terms log p(x|z) − KL via torch.distributions (grey x: the BCE)."""
    mean, logvar = model.autoencoder.encoder(x).chunk(2, 1)
    q = Normal(mean, (0.5 * logvar).exp())
    z = q.rsample((draws,))
    log_px = Bernoulli(logits=model.autoencoder.decoder(z.flatten(0, 1)), validate_args=False).log_prob(x.repeat(draws, 1, 1, 1))
    return log_px.flatten(1).sum(1).view(draws, -1) - kl_divergence(q, Normal(0.0, 1.0)).sum(1)


@pytest.mark.parametrize("sigma", [0.3, None])
def test_gaussian_likelihood_equals_closed_form_normal_nll(sigma):
    logits, x = torch.randn(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    lik = Gaussian(sigma)
    expected = -Normal(torch.sigmoid(logits), sigma or 1.0).log_prob(x).flatten(1).sum(1)
    assert lik.nll(logits, x).tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert [p.numel() for p in lik.parameters()] == ([] if sigma else [1])  # None: σ is learned
    unbounded = -Normal(logits, sigma or 1.0).log_prob(x).flatten(1).sum(1)
    assert Gaussian(sigma, bounded=False).nll(logits, x).tolist() == pytest.approx(unbounded.tolist(), rel=1e-5)


def test_conv_denoising_vae_learns_its_gaussian_sigma_and_iwae_beats_its_elbo():
    cfg = compose("model=vae", "net=conv", "noise=gaussian", "likelihood=gaussian", "likelihood.sigma=null",
                  "model.latent_dim=4", fast=False)
    torch.manual_seed(0)
    datamodule, model, _ = build(cfg)
    x_train, x_val = (datamodule.splits[k][0] for k in ("train", "val"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(60):
        x = x_train[torch.randint(len(x_train), (128,))]
        loss = model.autoencoder(x, model.autoencoder.corrupt(x)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.autoencoder.likelihood.log_sigma.item() < -0.1  # σ = 1 at the start; the fit pulls it down
    with torch.no_grad():
        nelbo = torch.stack([model.autoencoder(x_val, x_val).terms["nelbo"] for _ in range(50)]).mean()
    assert model.autoencoder.log_likelihood(x_val, 100).mean().item() > -nelbo.item()


def test_cli_run_writes_every_result_key_pictures_and_tensorboard_tags(run):
    from PIL import Image

    run_dir, results = run
    assert RESULT_KEYS <= results.keys()
    assert results["test/nll_iwae"] < results["test/nelbo"]  # the K=4 bound is tighter than the ELBO
    assert Image.open(run_dir / "manifold.png").size == (20 * 8, 20 * 8)  # 20×20 decoded 8×8 digits
    assert (run_dir / "latent_scatter.png").stat().st_size > 0 and (run_dir / "samples.png").stat().st_size > 0
    tags = tb_tags(run_dir)
    assert {"val/samples", "val/latent_manifold", "val/reconstructions"} <= tags["images"]
    assert {"val/kl", "val/nelbo", "val/recon", "val/active_units", "train/beta_step"} <= tags["scalars"]


def test_logged_test_figures_match_an_independent_recomputation(run):
    run_dir, results = run
    datamodule, model = load(run_dir)
    x = datamodule.splits["test"][0]
    with torch.no_grad():
        mean, logvar = model.autoencoder.encoder(x).chunk(2, 1)
    assert results["test/kl"] == pytest.approx(gaussian_kl(mean, logvar).mean().item(), rel=1e-4)
    assert results["test/active_units"] == (mean.var(0, unbiased=False) > 0.01).sum().item() == 2
    torch.manual_seed(0)
    elbo = elbo_draws(model, x, 200)
    # One draw per example was logged: its spread over draws sets the tolerance.
    assert results["test/nelbo"] == pytest.approx(-elbo.mean().item(), abs=5 * (elbo.var(0).mean() / len(x)).sqrt().item())
    iwae4 = model.autoencoder.log_likelihood(x.repeat(50, 1, 1, 1), 4).view(50, -1)
    assert results["test/nll_iwae"] == pytest.approx(-iwae4.mean().item(), abs=5 * (iwae4.var(0).mean() / len(x)).sqrt().item())


def iwae_mean(model, x, k: int, reps: int) -> tuple[float, float]:
    """The IWAE bound averaged over examples and `reps` independent estimates, and its standard error."""
    v = model.autoencoder.log_likelihood(x.repeat(reps, 1, 1, 1), k).view(reps, -1)
    return v.mean().item(), (v.var(0).mean() / v.numel()).sqrt().item()


def test_iwae_bounds_the_elbo_and_tightens_as_k_grows(run):
    datamodule, model = load(run[0])
    with torch.no_grad():  # a deliberately poor posterior, e² times too wide: the bounds lie far apart
        model.autoencoder.encoder[-1].bias[2:] += 2.0
    x = datamodule.splits["test"][0]
    torch.manual_seed(0)
    elbo = elbo_draws(model, x, 100).mean().item()
    (b1, s1), (b10, s10), (b100, s100) = (iwae_mean(model, x, k, r) for k, r in ((1, 100), (10, 10), (100, 10)))
    assert b10 - b1 > 3 * (s1 + s10) and b100 - b10 > 3 * (s10 + s100)
    assert model.autoencoder.log_likelihood(x, 1000).mean().item() > max(elbo, b100)
    # and after training, the K=1000 bound still lies above the ELBO
    datamodule, model = load(run[0])
    elbo = elbo_draws(model, x, 100).mean().item()
    assert model.autoencoder.log_likelihood(x, 1000).mean().item() > elbo


def test_iwae_with_one_sample_is_the_elbo_in_expectation(run):
    datamodule, model = load(run[0])
    x = datamodule.splits["test"][0]
    torch.manual_seed(0)
    one = model.autoencoder.log_likelihood(x.repeat(100, 1, 1, 1), 1).view(100, -1)
    elbo = elbo_draws(model, x, 100)
    se = ((one.var(0).mean() + elbo.var(0).mean()) / one.numel()).sqrt().item()
    assert one.mean().item() == pytest.approx(elbo.mean().item(), abs=5 * se)


def test_prior_samples_are_images_in_unit_range_of_the_data_shape(run):
    datamodule, model = load(run[0])
    x = model.autoencoder.sample(16, generator=torch.Generator().manual_seed(0))
    assert x.shape == (16, *datamodule.shape) and 0 <= x.min() and x.max() <= 1
    assert (x[0] - x[1]).abs().max() > 1e-3  # different z, different images


def test_dynamic_binarization_and_kl_warmup(tmp_path):
    """Training batches are fresh 0/1 samples each epoch; val stays fixed; the logged β ramps over warm-up."""
    import lightning.pytorch as pl

    seen = {"train": [], "val": []}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append(batch[0].clone())

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"].append(batch[0].clone())

    cfg = compose("model=vae", "data.binarize=dynamic", "data.batch_size=4096", "bottleneck.beta=0.5",
                  "bottleneck.warmup_epochs=2", run_dir=tmp_path)
    datamodule, model, _ = build(cfg)
    logger = pl.loggers.CSVLogger(tmp_path)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, callbacks=[Record()])
    trainer.fit(model, datamodule=datamodule)
    first, second = seen["train"][:2]  # the whole training set, once per epoch (order shuffled)
    grey = datamodule.splits["train"][0]
    assert set(first.unique().tolist()) == {0.0, 1.0} and len(first) == len(grey)
    # The per-pixel mean over the set ignores the order: it differs only if the samples are fresh.
    assert not torch.equal(first.mean(0), second.mean(0))
    assert (first.mean(0) - grey.mean(0)).abs().max() < 0.1
    assert torch.equal(seen["val"][0], seen["val"][1]) and set(seen["val"][0].unique().tolist()) == {0.0, 1.0}
    import csv

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        beta = [float(r["train/beta_step"]) for r in csv.DictReader(f) if r.get("train/beta_step")]
    assert beta == pytest.approx([0.0, 0.25, 0.5])  # one step per epoch, warm-up over two


def test_the_end_of_training_nll_is_bounded_to_the_first_test_examples_and_says_so(tmp_path, caplog):
    """eval.iwae_examples: the bound after training is that of the first examples only, drawn as an
    independent loop over them with the test's own generator draws it; the commands score every example."""
    import logging

    from autoenc.training.runs import load_run

    with caplog.at_level(logging.INFO, logger="autoenc"):
        results = train_here(tmp_path, "model=vae", "eval.iwae_samples=8", "eval.iwae_examples=50")
    assert results["test/nll_iwae_examples"] == 50
    assert any("on the first 50 of the 359 test examples" in r.getMessage() for r in caplog.records)
    run = load_run(tmp_path / "checkpoints" / "best.ckpt", iwae_samples=8, on="cpu")
    module, dm = run.module, run.datamodule
    assert module.iwae_examples is None  # commands: all of them
    g = module.generator("test", "iwae", "cpu")
    x = dm.transform(dm.splits["test"][0][:50])
    nll = torch.cat([-module.autoencoder.log_likelihood(x[i:i + dm.batch_size], 8, g, module.iwae_chunk)
                     for i in range(0, 50, dm.batch_size)])
    assert results["test/nll_iwae"] == pytest.approx(nll.mean().item(), rel=1e-5)
