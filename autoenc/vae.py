"""VAEModule: a Gaussian posterior, the reparameterized ELBO with β, prior samples and IWAE."""

from __future__ import annotations

import math

import torch

from autoenc.module import AutoencoderModule, Latent


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per example = ½ Σ (μ² + σ² − log σ² − 1) (Kingma & Welling 2014, app. B)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).sum(1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag σ²), summed over the last dimension."""
    return -0.5 * ((z - mean).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(-1)


class VAEModule(AutoencoderModule):
    """Variational autoencoder in the shared pipeline: loss = −ELBO with KL weighted by β."""

    head_mult = 2

    def __init__(self, *args, beta: float = 1.0, warmup_epochs: float = 0.0, iwae_samples: int = 0,
                 iwae_chunk: int = 100, **kw):
        super().__init__(*args, **kw)
        self.beta, self.warmup_epochs = beta, warmup_epochs
        self.iwae_samples, self.iwae_chunk = iwae_samples, iwae_chunk

    def encode(self, x: torch.Tensor) -> Latent:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # reparameterization trick
        return Latent(z, mean, logvar)

    def beta_now(self) -> float:
        """β, ramped linearly from 0 over the first `warmup_epochs` epochs of training (evaluation uses β)."""
        if self.warmup_epochs <= 0 or self._trainer is None or not self.trainer.training:
            return self.beta
        loader = self.trainer.train_dataloader  # autoenc.data.Grouped: steps, not training_step calls
        steps_per_epoch = min(len(loader.batches), self.trainer.num_training_batches * loader.steps)
        progress = self.global_step / max(1, self.warmup_epochs * steps_per_epoch)
        return self.beta * min(1.0, progress)

    def loss_terms(self, x, x_tilde):
        terms, latent, logits = super().loss_terms(x, x_tilde)
        kl = gaussian_kl(latent.mean, latent.logvar).mean()
        beta = self.beta_now()
        terms.update(loss=terms["loss"] + beta * kl, kl=kl, nelbo=terms["recon"] + kl)
        if self.training:
            terms["beta"] = kl.new_tensor(beta)
        return terms, latent, logits

    def test_step(self, batch, batch_idx):
        super().test_step(batch, batch_idx)
        if self.iwae_samples:
            x, _ = batch  # the clean x: with noise= any q(z|x) is still a valid proposal
            nll = -self.log_likelihood(x, self.iwae_samples).mean()
            self.log("test/nll_iwae", nll, on_epoch=True, batch_size=len(x), sync_dist=True)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """IWAE estimate of log p(x) per example with k importance samples (Burda et al. 2015, eq. 8)."""
        mean, logvar = self.encoder(x).float().chunk(2, dim=1)  # float32 even under bf16 autocast
        chunks = []
        for start in range(0, k, self.iwae_chunk):
            n = min(self.iwae_chunk, k - start)
            z = mean + torch.exp(0.5 * logvar) * torch.randn(n, *mean.shape, device=x.device)  # (n, B, d)
            logits = self.decode(z.flatten(0, 1))
            log_px = -self.likelihood.nll(logits, x.repeat(n, *[1] * (x.dim() - 1))).view(n, -1)
            log_pz = log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
            chunks.append(log_px + log_pz - log_normal(z, mean, logvar))
        return torch.logsumexp(torch.cat(chunks), 0) - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [0, 1] decoded from z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=generator, device=self.device)
        return self.likelihood.mean(self.decode(z))

    def split_figures(self, stats):
        # Active units: dimensions whose posterior mean varies over the data, Cov_x(E_q[z_i]) > 0.01
        # (Burda et al. 2015, sec. 5.2).
        var = stats["sq"] / stats["n"] - (stats["sum"] / stats["n"]) ** 2
        return {**super().split_figures(stats), "active_units": (var > 0.01).sum().float()}
