"""AutoencoderModule: x ─corrupt→ x̃ ─encode→ z ─decode→ x̂; loss = recon(x̂, x) + penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from autoenc.penalties import Penalty, Sparsity


@dataclass
class Latent:
    """The encoder's output: the code z and, for a Gaussian posterior, its mean and log-variance."""

    z: torch.Tensor
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None

    @property
    def code(self) -> torch.Tensor:
        """The deterministic code: the posterior mean where there is one."""
        return self.z if self.mean is None else self.mean


class Bernoulli(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits)); also the usual BCE loss for [0, 1] pixels."""

    def __init__(self, sigma: float | None = None):
        super().__init__()

    def nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per example, summed over pixels (nats)."""
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class Gaussian(Bernoulli):
    """p(x|z) = N(sigmoid(logits), σ²); σ fixed by `sigma`, or learned (one scalar) when None."""

    def __init__(self, sigma: float | None = None):
        super().__init__()
        log_sigma = torch.tensor(math.log(sigma) if sigma else 0.0)
        self.log_sigma = nn.Parameter(log_sigma) if sigma is None else None
        if sigma is not None:
            self.register_buffer("fixed_log_sigma", log_sigma)

    def nll(self, logits, x):
        log_sigma = self.log_sigma if self.log_sigma is not None else self.fixed_log_sigma
        z2 = ((x - torch.sigmoid(logits)) * torch.exp(-log_sigma)) ** 2
        return (0.5 * z2 + log_sigma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR, 10·log10(1/MSE) dB on [0, 1] pixels (capped at 100 dB)."""
    # Per image, not per set: logged with batch_size weights, the epoch value is the split's mean
    # per-image PSNR whatever the batching (the figure denoising papers report).
    mse = (x_hat - x).flatten(1).pow(2).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


LIKELIHOODS = {"bernoulli": Bernoulli, "gaussian": Gaussian}
STAGES = ("train", "val", "test")


class AutoencoderModule(pl.LightningModule):
    """The one pipeline for every family; noise, penalty and bottleneck are its seams."""

    head_mult = 1  # encoder head width = latent_dim · head_mult (2 for a Gaussian posterior)

    def __init__(self, net, shape, latent_dim: int = 16, likelihood: str = "bernoulli",
                 sigma: float | None = None, noise=None, penalty: Penalty | None = None,
                 optimizer=None, scheduler=None, noise_seed: int = 1234, seed: int = 0,
                 compile: bool = False, grad_clip: float | None = None, **_):
        super().__init__()
        # training_step runs the optimizer steps itself: one per batch of the group it is given
        self.automatic_optimization = False
        self.grad_clip = grad_clip
        self.shape, self.latent_dim = tuple(shape), latent_dim
        self.encoder, self.decoder = net(shape=self.shape, latent_dim=latent_dim, head_mult=self.head_mult)
        self.likelihood = LIKELIHOODS[likelihood](sigma)
        self.noise, self.penalty = noise, penalty or Penalty()
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory = scheduler
        self.noise_seed, self.seed = noise_seed, seed
        self.run_config: dict | None = None  # the resolved run config, stored in checkpoints
        self._generators: dict[str, torch.Generator] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self.epoch_figures: dict[str, torch.Tensor] = {}
        self._train_epoch: dict = {}  # n, keys, sums of the epoch's step values (a dict: cheap to update)
        if compile:  # in place, so parameter names (and checkpoints) stay those of the plain modules
            self.encoder.compile()
            self.decoder.compile()

    # ---- the pipeline -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> Latent:
        return Latent(self.penalty.code(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits; the likelihood owns the output activation."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1] from the deterministic code."""
        return self.likelihood.mean(self.decode(self.encode(x).code))

    def corrupt(self, x: torch.Tensor, stage: str = "train") -> torch.Tensor:
        if self.noise is None:
            return x
        g = self._generators.get(stage)
        if g is None or g.device != x.device:
            # Training noise follows the run's seed; val/test noise restarts from a fixed seed each
            # epoch so that their curves compare like with like.
            seed = torch.randint(2**62, ()).item() if stage == "train" else self.noise_seed
            g = self._generators[stage] = torch.Generator(device=x.device).manual_seed(seed)
        return self.noise(x, g)

    def loss_terms(self, x: torch.Tensor, x_tilde: torch.Tensor):
        """Loss and its parts (per-example means); the reconstruction target is the clean x."""
        latent = self.encode(x_tilde)
        logits = self.decode(latent.z)
        recon = self.likelihood.nll(logits, x).mean()
        penalty, stats = self.penalty(latent.z, x_tilde, self.encoder)
        return {"loss": recon + penalty, "recon": recon, "penalty": penalty, **stats}, latent, logits

    def _shared_step(self, batch, stage: str):
        x, _ = batch
        x_tilde = self.corrupt(x, stage)
        terms, latent, logits = self.loss_terms(x, x_tilde)
        if stage != "train":
            if latent.mean is not None:
                logits = self.decode(latent.mean)
            self._accumulate(latent)
        x_hat = self.likelihood.mean(logits.detach())
        terms["mse"] = F.mse_loss(x_hat, x)
        if stage != "train":
            if self.noise is not None:
                terms |= {"psnr_noisy": psnr(x_tilde, x), "psnr_denoised": psnr(x_hat, x)}
            for k, v in terms.items():
                self.log(f"{stage}/{k}", v.detach(), batch_size=len(x), sync_dist=True, prog_bar=k == "loss")
        return terms, latent

    def training_step(self, batches, batch_idx):
        """One optimizer step per batch of the group (data.steps_per_call); returns their losses."""
        opt, losses = self.optimizers(), []
        for batch in batches:
            if 0 <= self.trainer.max_steps <= self.global_step:
                break
            terms, _ = self._shared_step(batch, "train")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(terms["loss"])
            if self.grad_clip:
                self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            losses.append(self._log_train(terms, len(batch[0])))
        return {"losses": torch.stack(losses)}

    def _log_train(self, terms: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Keeps epoch sums on the device and writes step values every `log_every_n_steps` steps; one
        `self.log` per term and step costs more than a small model's step (scripts/benchmark.py)."""
        values = torch.stack([v.detach().float() for v in terms.values()])
        acc = self._train_epoch
        if acc:
            acc["sum"].add_(values, alpha=n)
            acc["n"] += n
        else:
            acc.update(sum=n * values, n=n, keys=list(terms))
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:
            step = {f"train/{k}_step": v for k, v in zip(terms, values.tolist())}
            for logger in self.loggers:
                logger.log_metrics(step, step=self.global_step)
            self.log("train/loss_step", step["train/loss_step"], logger=False, prog_bar=True)
        return values[0]

    def on_train_epoch_end(self):
        acc = self._train_epoch
        if acc:
            for k, v in zip(acc["keys"], acc["sum"] / acc["n"]):
                self.log(f"train/{k}_epoch", v, prog_bar=k == "loss")
        acc.clear()
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log_step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def log_step(self) -> None:
        """Puts epoch-level values at the optimizer step on TensorBoard's x-axis, like the step values
        (Lightning's default counts training_step calls, fewer when data.steps_per_call > 1)."""
        self.log("step", float(self.global_step))

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")

    # ---- whole-split latent statistics (dead units, active units) ---------------------------
    def _accumulate(self, latent: Latent) -> None:
        code = latent.code.detach().float()
        parts = {"n": torch.tensor(float(len(code)), device=code.device), "sum": code.sum(0),
                 "sq": code.pow(2).sum(0)}
        if isinstance(self.penalty, Sparsity):
            parts["active"] = self.penalty.active(latent.z).float().sum(0)
        for k, v in parts.items():
            self._stats[k] = self._stats[k] + v if k in self._stats else v

    def split_figures(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Figures over a whole split from summed latent statistics."""
        if "active" not in stats:
            return {}
        freq = stats["active"] / stats["n"]
        return {"dead_fraction": (freq == 0).float().mean(), "activation_frequency": freq}

    def _end_epoch(self, stage: str) -> None:
        stats = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._stats.items()}
        self._stats = {}
        if not stats or self.trainer.sanity_checking:
            return
        self.epoch_figures = self.split_figures(stats)
        self.log_dict({f"{stage}/{k}": v for k, v in self.epoch_figures.items() if v.dim() == 0})
        self.log_step()

    def on_train_epoch_start(self):
        # Each epoch's randomness (sampling, training noise) is a function of (seed, epoch, rank), so
        # a run resumed from an epoch's checkpoint continues exactly as the uninterrupted run would.
        torch.manual_seed(hash((self.seed, self.current_epoch, self.global_rank)) % 2**63)
        self._generators.pop("train", None)

    def on_validation_epoch_start(self):
        self._stats, _ = {}, self._generators.pop("val", None)

    def on_test_epoch_start(self):
        self._stats, _ = {}, self._generators.pop("test", None)

    def on_validation_epoch_end(self):
        self._end_epoch("val")

    def on_test_epoch_end(self):
        self._end_epoch("test")

    # ---- optimisation and checkpoints ---------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": self.scheduler_factory(opt)}  # stepped each epoch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["autoenc_config"] = self.run_config
