"""AutoencoderModule: the Lightning shell (steps, logging, optimizers, schedules) around autoenc.model.core."""

from __future__ import annotations

import inspect
import logging
import math
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from autoenc.model.core import Autoencoder
from autoenc.util.errors import is_integer, is_number, require
from autoenc.model.metrics import SplitStatistics, psnr
from autoenc.model.conditions import Condition
from autoenc.model.penalties import Penalty
from autoenc.util.seeds import Stream, derive

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


def compile_forwards(parts, setting: str) -> None:
    """torch.compile of each part (nn.Module.compile: parameter names, so checkpoints, stay those of the plain
    modules, and a copy or a pickle runs eager); where compiling a forward fails, every part runs eager from
    then on, with one warning."""
    from torch._dynamo.exc import TorchDynamoException

    def falling_back(fast):
        def call(*args, **kwargs):
            try:
                return fast(*args, **kwargs)
            except TorchDynamoException as e:  # an error of the model itself is raised again by the eager call
                if parts[0]._compiled_call_impl is not None:
                    inner = getattr(e, "inner_exception", None) or e  # what the backend raised
                    first = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
                    log.warning(f"{setting}: torch.compile failed ({type(inner).__name__}: {first}); "
                                "training goes on eager")
                for part in parts:
                    part._compiled_call_impl = None
                return call.eager(*args, **kwargs)

        return call

    for part in parts:
        part.compile()
        part._compiled_call_impl = falling_back(part._compiled_call_impl)
        part._compiled_call_impl.eager = part._call_impl


class AutoencoderModule(pl.LightningModule):
    """The Lightning shell around an Autoencoder (autoenc.model.core): the steps and their randomness, logging,
    whole-split figures, optimizers and schedules; the pipeline and its loss live in the Autoencoder."""

    def __init__(self, net, shape, bottleneck=None, likelihood=None, latent_dim: int = 16, noise=None,
                 penalty: Penalty | None = None, optimizer=None, scheduler=None, lr_schedule=None,
                 iwae_samples: int = 0, iwae_chunk: int = 100, iwae_examples: int | None = None,
                 seed: int = 0, noise_seed: int = 1234,
                 compile: str | None = None, weight_penalty: float = 0.0, condition: str | None = None, labels=None,
                 autoencoder: Autoencoder | None = None):
        super().__init__()
        require(is_integer(iwae_samples) and iwae_samples >= 0, "model.iwae_samples", iwae_samples, "an integer ≥ 0")
        require(is_integer(iwae_chunk) and iwae_chunk >= 1, "model.iwae_chunk", iwae_chunk, "a positive integer")
        compile = {False: None, True: "nets"}.get(compile, compile)  # (the former switch)
        require(compile in (None, "nets", "loss"), "model.compile", compile,
                "null (eager), nets (the encoder and decoder) or loss (the whole loss computation)")
        require(iwae_examples is None or (is_integer(iwae_examples) and iwae_examples >= 1), "eval.iwae_examples",
                iwae_examples, "a positive integer, or null (all)")
        interval = (lr_schedule or {}).get("interval", "epoch")
        require(interval in ("step", "epoch"), "model.lr_schedule.interval", interval, "step or epoch")
        # `autoencoder`: one already built (a trained run's, for a test loop), which the other settings describe
        self.autoencoder = autoencoder or Autoencoder(net, shape, latent_dim, bottleneck, likelihood, noise, penalty,
                                                      weight_penalty, Condition.named(condition, labels))
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        lr = getattr(self.optimizer_factory, "keywords", {}).get("lr", 1e-3)
        require(not is_number(lr) or lr > 0, "model.optimizer.lr", lr, "a number > 0")
        self.scheduler_factory, self.lr_schedule = scheduler, dict(lr_schedule or {})
        self.iwae_samples, self.iwae_chunk, self.iwae_examples = iwae_samples, iwae_chunk, iwae_examples
        self.iwae_scored = 0  # test examples the importance-weighted NLL was computed on, this test
        self.noise_seed, self.seed = noise_seed, seed
        self._streams: dict[tuple, Stream] = {}  # training randomness, reseeded every step
        self._generators: dict[tuple, torch.Generator] = {}  # val/test randomness, restarted every epoch
        self.statistics = SplitStatistics()
        self.epoch_figures: dict[str, torch.Tensor] = {}
        self._train_steps: list = []  # (term names, their values, batch size) of each step of the epoch
        ae = self.autoencoder
        if autoencoder is None and compile:  # (a trained run's autoencoder is given for a test loop: left eager)
            compile_forwards({"nets": [ae.encoder, ae.decoder], "loss": [ae]}[compile], f"model.compile={compile}")

    def forward(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Reconstruction from the deterministic code (the posterior mean where there is one)."""
        return self.autoencoder.reconstruct(x, y)

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

    def _shared_step(self, batch, stage: str, progress: float | None = None) -> dict[str, torch.Tensor]:
        x, y = batch
        ae = self.autoencoder
        x_tilde = ae.corrupt(x, self.generator(stage, "noise", x.device))
        out = ae(x, x_tilde, progress, self.generator(stage, "model", x.device), y)
        terms = out.terms
        if stage == "train":
            return terms
        latent = out.latent
        logits = out.logits if latent.z is latent.code else ae.decode(latent.code, y)  # the deterministic code
        x_hat = ae.likelihood.mean(logits)
        self.statistics.update(latent.code, ae.bottleneck.tally(latent), x, x_hat)
        terms["mse"] = F.mse_loss(x_hat, x)
        if ae.noise is not None:
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
        loggers every `log_every_n_steps` steps, at the step's own index.
        Written to the loggers directly, not through `self.log`: a `self.log` per term and step costs a
        measurable share of a small model's step (docs/speed.md)."""
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
        # the bound's cost is K decoder passes an example: at most iwae_examples of them (the first ones,
        # shared equally by the ranks), so that the test after training stays short next to the training
        room = len(batch[0]) if self.iwae_examples is None else \
            min(len(batch[0]), self.iwae_examples // self.trainer.world_size - self.iwae_scored)
        if self.iwae_samples and room > 0:
            x, y = (t[:room] for t in batch)  # the clean x: with noise= any q(z|x) is still a valid proposal
            self.iwae_scored += len(x)
            g = self.generator("test", "iwae", x.device)
            ae = self.autoencoder
            for name, score in ae.bottleneck.scores(ae, x, self.iwae_samples, g, self.iwae_chunk, y).items():
                self.log(f"test/{name}", score.mean(), batch_size=len(x), sync_dist=True)

    def _end_epoch(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self.statistics.reset()
            return
        figures = self.statistics.figures(self.autoencoder.bottleneck,
                                          lambda v: self.trainer.strategy.reduce(v, reduce_op="sum"))
        self.statistics.reset()
        if figures:
            self.epoch_figures = figures
            self.log_dict({f"{stage}/{k}": v for k, v in figures.items() if v.dim() == 0})

    def on_train_epoch_start(self):
        # torch's global generator is left to user code (e.g. dropout in a custom net): seeded per epoch
        torch.manual_seed(derive(self.seed, "global", self.current_epoch, self.global_rank))
        self._train_steps = []  # (not called when a run resumes inside an epoch)

    def _restart(self, stage: str) -> None:
        self.statistics.reset()
        for key in [k for k in self._generators if k[0] == stage]:
            del self._generators[key]

    def on_validation_epoch_start(self):
        self._restart("val")

    def on_test_epoch_start(self):
        self._restart("test")
        self.iwae_scored = 0

    def on_validation_epoch_end(self):
        self._end_epoch("val")

    def on_test_epoch_end(self):
        self._end_epoch("test")

    # ---- optimisation and checkpoints ---------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer()
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

    def optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer; Adam and AdamW with their fused kernel (one kernel for every parameter's
        update) unless the config sets `fused` or `foreach`, and where the device, dtype or torch release has
        no fused kernel, with the foreach one."""
        factory = self.optimizer_factory
        given = getattr(factory, "keywords", {})
        if getattr(factory, "func", factory) not in (torch.optim.Adam, torch.optim.AdamW) or \
                given.get("fused") is not None or given.get("foreach") is not None:
            return factory(self.parameters())
        try:
            return factory(self.parameters(), fused=True)
        except (RuntimeError, ValueError) as e:
            log.info(f"no fused {getattr(factory, 'func', factory).__name__} here ({e}); using its foreach kernel")
            return factory(self.parameters(), foreach=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._train_steps:  # so that a mid-epoch resume logs the whole epoch's means
            checkpoint["autoenc_train_steps"] = [(list(k), v.cpu(), n) for k, v, n in self._train_steps]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a resumed epoch's earlier steps, for its means
        self._train_steps = [(tuple(k), v.to(self.device), n) for k, v, n in checkpoint.get("autoenc_train_steps", [])]
