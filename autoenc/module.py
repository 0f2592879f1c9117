"""AutoencoderModule: x ─noise→ x̃ ─encoder→ h ─bottleneck→ z ─decoder→ logits ─likelihood→ x̂."""

from __future__ import annotations

import inspect
import logging
import math
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from autoenc.bottlenecks import Latent, Linear
from autoenc.errors import UserError
from autoenc.likelihoods import Bernoulli
from autoenc.penalties import Penalty
from autoenc.seeds import Stream, derive

log = logging.getLogger("autoenc")


def epoch_means(steps: list) -> dict[str, torch.Tensor]:
    """Each term's batch-size-weighted mean over the steps that had it (terms may start mid-epoch)."""
    groups: dict[tuple, list] = {}
    for keys, values, n in steps:
        groups.setdefault(keys, []).append((values, n))
    sums, counts = {}, {}
    for keys, rows in groups.items():
        w = rows[0][0].new_tensor([n for _, n in rows])
        total = (torch.stack([v for v, _ in rows]) * w[:, None]).sum(0)
        for k, v in zip(keys, total):
            sums[k], counts[k] = sums.get(k, 0) + v, counts.get(k, 0) + w.sum()
    return {k: sums[k] / counts[k] for k in sums}


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR, 10·log10(1/MSE) dB on [0, 1] pixels (capped at 100 dB)."""
    # Per image, not per set: logged with batch_size weights, the epoch value is the split's mean
    # per-image PSNR whatever the batching (the figure denoising papers report).
    mse = (x_hat - x).flatten(1).pow(2).mean(1)
    return (-10 * torch.log10(mse.clamp_min(1e-10))).mean()


class AutoencoderModule(pl.LightningModule):
    """The one pipeline for every family; noise, bottleneck, penalty and likelihood are its seams.
    loss = −log p(x | z) + the bottleneck's term (β·KL for a Gaussian) + penalty, x the clean input."""

    def __init__(self, net, shape, bottleneck=None, likelihood=None, latent_dim: int = 16, noise=None,
                 penalty: Penalty | None = None, optimizer=None, scheduler=None, lr_schedule=None,
                 iwae_samples: int = 0, iwae_chunk: int = 100, seed: int = 0, noise_seed: int = 1234,
                 compile: bool = False):
        super().__init__()
        self.shape, self.latent_dim = tuple(shape), latent_dim
        self.bottleneck = bottleneck if bottleneck is not None else Linear()
        self.bottleneck.setup(latent_dim)
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.encoder, self.decoder = net(shape=self.shape, latent_dim=latent_dim,
                                         head_dim=self.bottleneck.head_dim(latent_dim))
        self.noise, self.penalty = noise, penalty or Penalty()
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.scheduler_factory, self.lr_schedule = scheduler, dict(lr_schedule or {})
        self.iwae_samples, self.iwae_chunk = iwae_samples, iwae_chunk
        self.noise_seed, self.seed = noise_seed, seed
        self.run_config: dict | None = None  # the resolved run config, stored in checkpoints
        self._streams: dict[tuple, Stream] = {}  # training randomness, reseeded every step
        self._generators: dict[tuple, torch.Generator] = {}  # val/test randomness, restarted every epoch
        self._stats: dict[str, torch.Tensor] = {}
        self.epoch_figures: dict[str, torch.Tensor] = {}
        self._train_steps: list = []  # (term names, their values, batch size) of each step of the epoch
        if compile:  # in place, so parameter names (and checkpoints) stay those of the plain modules
            self.encoder.compile()
            self.decoder.compile()

    # ---- the pipeline -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Latent:
        return self.bottleneck(self.encoder(x), generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Logits; the likelihood owns the output activation."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the deterministic code (the posterior mean where there is one)."""
        return self.likelihood.mean(self.decode(self.encode(x).code))

    def generator(self, stage: str, name: str, device) -> torch.Generator:
        """The generator of one source of randomness (`noise`, `model` sampling) for this stage. Training
        reseeds it at every batch from (seed, name, rank, batch index), so a run resumed at any step draws
        what the uninterrupted run drew; val/test restart it from noise_seed every epoch, so that their
        curves compare like with like across epochs and runs. Each rank draws its own shard's."""
        rank = self.global_rank
        if stage == "train":
            stream = self._streams.get((name, rank))
            if stream is None:
                stream = self._streams[name, rank] = Stream(self.seed, name, rank)
            return stream.at(self.trainer.fit_loop.total_batch_idx if self._trainer else 0, device)
        g = self._generators.get((stage, name))
        if g is None or g.device != torch.device(device):
            g = self._generators[stage, name] = torch.Generator(device=device).manual_seed(
                derive(self.noise_seed, f"{name}/{stage}", 0, rank))
        return g

    def corrupt(self, x: torch.Tensor, stage: str = "train") -> torch.Tensor:
        return x if self.noise is None else self.noise(x, self.generator(stage, "noise", x.device))

    def loss_terms(self, x: torch.Tensor, x_tilde: torch.Tensor, progress: float | None = None,
                   generator: torch.Generator | None = None):
        """Loss and its parts (per-example sums, batch means); the reconstruction target is the clean x.
        `progress`: epochs of training done (for the bottleneck's warm-up), None outside training;
        `generator`: the sampling's randomness (None: torch's global generator)."""
        latent = self.encode(x_tilde, generator)
        logits = self.decode(latent.z)
        recon = self.likelihood.nll(logits, x).mean()
        extra, terms = self.bottleneck.terms(latent, recon, progress)
        penalty, stats = self.penalty(latent.code, x_tilde, self.encoder, self.bottleneck, generator)
        loss = recon
        for term in (extra, penalty):  # the terms that exist: no zeros added on every step
            loss = loss if term is None else loss + term
        parts = {"loss": loss, "recon": recon, **({} if penalty is None else {"penalty": penalty})}
        aux = self.bottleneck.auxiliary(latent, progress is not None)
        if aux is not None:
            # AuxK: the auxiliary code's decoding, added to the code's, must explain the rest of x; only
            # the auxiliary code and the decoder's part for it get gradient (Gao et al. 2024, eq. 2)
            z_aux, weight = aux
            aux_logits = logits.detach() + self.decode(z_aux) - self.decode(torch.zeros_like(z_aux))
            parts["auxk"] = self.likelihood.nll(aux_logits, x).mean()
            parts["loss"] = loss + weight * parts["auxk"]
        return {**parts, **terms, **stats}, latent, logits

    def _shared_step(self, batch, stage: str, progress: float | None = None):
        x, _ = batch
        x_tilde = self.corrupt(x, stage)
        terms, latent, logits = self.loss_terms(x, x_tilde, progress, self.generator(stage, "model", x.device))
        if stage == "train":
            return terms
        if latent.z is not latent.code:  # evaluation reconstructs from the deterministic code
            logits = self.decode(latent.code)
        x_hat = self.likelihood.mean(logits)
        self._accumulate(latent, x, x_hat)
        terms["mse"] = F.mse_loss(x_hat, x)
        if self.noise is not None:
            terms |= {"psnr_noisy": psnr(x_tilde, x), "psnr_denoised": psnr(x_hat, x)}
        for k, v in terms.items():
            self.log(f"{stage}/{k}", v.detach(), batch_size=len(x), sync_dist=True, prog_bar=k == "loss")
        return terms

    def training_step(self, batch, batch_idx):
        progress = self.current_epoch + batch_idx / max(1, self.trainer.num_training_batches)
        terms = self._shared_step(batch, "train", progress)
        self._log_train(terms, len(batch[0]))
        return terms["loss"]

    def _log_train(self, terms: dict[str, torch.Tensor], n: int) -> None:
        """Keeps each step's values (detached, on the device) for the epoch means, and writes them to the
        loggers every `log_every_n_steps` steps: one `self.log` per term and step costs more than a
        small model's step (scripts/benchmark.py)."""
        values = torch.stack([v.detach() for v in terms.values()])
        self._train_steps.append((tuple(terms), values, n))
        step = self.global_step
        if self.trainer.log_every_n_steps and step % self.trainer.log_every_n_steps == 0:
            logged = {f"train/{k}_step": v for k, v in zip(terms, values.tolist())}
            logged["train/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
            for logger in self.loggers:
                logger.log_metrics(logged, step=step)
            self.log("train/loss_step", logged["train/loss_step"], logger=False, prog_bar=True)

    def on_train_epoch_end(self):
        for k, v in epoch_means(self._train_steps).items():
            self.log(f"train/{k}_epoch", v, prog_bar=k == "loss", sync_dist=True)
        self._train_steps = []

    def validation_step(self, batch, batch_idx):
        self._shared_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._shared_step(batch, "test")
        if self.bottleneck.stochastic and self.iwae_samples:
            x = batch[0]  # the clean x: with noise= any q(z|x) is still a valid proposal
            nll = -self.log_likelihood(x, self.iwae_samples, self.generator("test", "iwae", x.device)).mean()
            self.log("test/nll_iwae", nll, batch_size=len(x), sync_dist=True)

    # ---- what a stochastic bottleneck brings: prior samples and the IWAE bound -------------
    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """IWAE estimate of log p(x) per example with k importance samples (Burda et al. 2015, eq. 8)."""
        h = self.encoder(x).float()  # float32 even under bf16 autocast
        chunks = []
        for start in range(0, k, self.iwae_chunk):
            n = min(self.iwae_chunk, k - start)
            z, log_w = self.bottleneck.importance_samples(h, n, generator)  # (n, B, d), log p(z) − log q(z|x)
            logits = self.decode(z.flatten(0, 1)).float()
            log_px = -self.likelihood.nll(logits, x.repeat(n, *[1] * (x.dim() - 1))).view(n, -1)
            chunks.append(log_px + log_w)
        return torch.logsumexp(torch.cat(chunks), 0) - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n examples decoded from prior samples z ~ p(z) (a stochastic bottleneck only)."""
        if not self.bottleneck.stochastic:
            raise UserError(f"bottleneck={type(self.bottleneck).__name__.lower()} has no prior to sample from; "
                            "`sample` needs a model trained with bottleneck=gaussian (model=vae); "
                            "try reconstruct or interpolate")
        z = self.bottleneck.prior_sample(n, self.latent_dim, generator, self.device)
        return self.likelihood.mean(self.decode(z))

    # ---- whole-split code statistics (dead units, active units) -----------------------------
    def _accumulate(self, latent: Latent, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        code, x, x_hat = latent.code.detach().float(), x.flatten(1).float(), x_hat.detach().flatten(1).float()
        parts = {"n": torch.tensor(float(len(code)), device=code.device), "sum": code.sum(0),
                 "sq": code.pow(2).sum(0), "sse": (x - x_hat).pow(2).sum(), "x_sum": x.sum(0), "x_sq": x.pow(2).sum()}
        active = self.bottleneck.active(code)
        if active is not None:
            parts["active"] = active.float().sum(0)
        for k, v in parts.items():
            self._stats[k] = self._stats[k] + v if k in self._stats else v

    def _end_epoch(self, stage: str) -> None:
        stats = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._stats.items()}
        self._stats = {}
        if not stats or self.trainer.sanity_checking:
            return
        self.epoch_figures = self.bottleneck.split_figures(stats)
        # fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the split's mean example
        self.epoch_figures["fvu"] = stats["sse"] / (stats["x_sq"] - stats["x_sum"].pow(2).sum() / stats["n"]).clamp_min(1e-12)
        self.log_dict({f"{stage}/{k}": v for k, v in self.epoch_figures.items() if v.dim() == 0})

    def on_train_epoch_start(self):
        # torch's global generator is left to user code (e.g. dropout in a custom net): seeded per epoch
        torch.manual_seed(derive(self.seed, "global", self.current_epoch, self.global_rank))
        self._train_steps = []  # (not called when a run resumes inside an epoch)

    def _restart(self, stage: str) -> None:
        self._stats = {}
        for key in [k for k in self._generators if k[0] == stage]:
            del self._generators[key]

    def on_validation_epoch_start(self):
        self._restart("val")

    def on_test_epoch_start(self):
        self._restart("test")

    def on_validation_epoch_end(self):
        self._end_epoch("val")

    def on_test_epoch_end(self):
        self._end_epoch("test")

    # ---- optimisation and checkpoints ---------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        config = {"interval": "epoch", **self.lr_schedule}
        factory = self.scheduler_factory
        # A length the config leaves unset (cosine's T_max, a linear decay's total_iters) is the run's.
        given = getattr(factory, "keywords", {})
        missing = [k for k in ("T_max", "total_iters", "total_steps")
                   if k in inspect.signature(getattr(factory, "func", factory)).parameters and given.get(k) is None]
        if missing:
            t = self.trainer
            length = t.estimated_stepping_batches if config["interval"] == "step" else t.max_epochs
            if length is None or length < 1 or math.isinf(length):
                log.warning("the learning-rate schedule needs the run's length (trainer.max_epochs or "
                            "trainer.max_steps); training at a constant rate instead")
                return opt
            factory = partial(factory, **{k: int(length) for k in missing})
        return {"optimizer": opt, "lr_scheduler": {"scheduler": factory(opt), **config}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            checkpoint["autoenc_config"] = self.run_config
        if self._train_steps:  # so that a mid-epoch resume logs the whole epoch's means
            checkpoint["autoenc_train_steps"] = [(list(k), v.cpu(), n) for k, v, n in self._train_steps]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed epoch's earlier steps, for its means
        self._train_steps = [(tuple(k), v.to(self.device), n) for k, v, n in checkpoint.get("autoenc_train_steps", [])]
