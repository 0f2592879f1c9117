"""Pictures as Lightning callbacks: grids to TensorBoard each epoch and PNGs in the run directory."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import make_grid, save_image


def image_loggers(trainer):
    """The trainer's loggers that can show images (TensorBoard's SummaryWriter)."""
    return [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]


def publish(trainer, tag: str, grid: torch.Tensor, png: Path | None) -> None:
    """Sends a picture to TensorBoard at the current step and (rank 0) writes it as PNG."""
    for writer in image_loggers(trainer):
        writer.add_image(tag, grid, trainer.global_step)
    if png is not None and trainer.is_global_zero:
        png.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, png)


def grid_of_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stacks equal-length image rows (N, C, H, W) into one grid image."""
    return make_grid(torch.cat(rows).float().clamp(0, 1).cpu(), nrow=len(rows[0]), pad_value=1.0)


def fixed_examples(trainer, split: str, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a split as [0, 1] floats on `device` (the same every epoch)."""
    from autoenc.data import to_unit

    x, y = trainer.datamodule.splits[split]
    return to_unit(x[:n]).to(device), y[:n]


class Pictures(Callback):
    """The run's pictures, to TensorBoard at each validation and as PNGs in the run directory: rows of
    clean | corrupted (with noise) | reconstructed validation images; prior samples (stochastic
    bottleneck); the units' activation frequencies and the decoder's features (codes with active
    units); the decoded latent manifold and a scatter of test codes (2-D latent). One callback, so
    that Lightning dispatches its per-step hooks once (scripts/benchmark.py)."""

    def __init__(self, dirpath: str = ".", reconstructions: int = 16, samples: int = 64, manifold: int = 20,
                 scatter_examples: int = 2000, seed: int = 0):
        self.dir, self.n, self.samples, self.manifold = Path(dirpath), reconstructions, samples, manifold
        self.scatter_examples, self.seed = scatter_examples, seed

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if self.n:
            x, _ = fixed_examples(trainer, "val", self.n, pl_module.device)
            g = torch.Generator(device=x.device).manual_seed(pl_module.noise_seed)
            x_tilde = x if pl_module.noise is None else pl_module.noise(x, g)
            rows = [x] + ([x_tilde] if pl_module.noise is not None else []) + [pl_module(x_tilde)]
            publish(trainer, "val/reconstructions", grid_of_rows(rows), self.dir / "reconstructions.png")
        if self.samples and pl_module.bottleneck.stochastic:
            g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
            x = pl_module.sample(self.samples, generator=g)
            publish(trainer, "val/samples", make_grid(x.cpu(), nrow=int(self.samples ** 0.5), pad_value=1.0),
                    self.dir / "samples.png")
        if self.manifold and pl_module.latent_dim == 2:
            # Points at evenly spaced quantiles of N(0, 1), as in Kingma & Welling (2014), fig. 4.
            q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, self.manifold))
            zz = torch.cartesian_prod(q.flip(0), q)[:, [1, 0]].to(pl_module.device)
            x = pl_module.likelihood.mean(pl_module.decode(zz))
            publish(trainer, "val/latent_manifold", make_grid(x.cpu(), nrow=self.manifold, padding=0),
                    self.dir / "manifold.png")

    def on_validation_end(self, trainer, pl_module):
        # Not on_validation_epoch_end: callbacks run before the module's hook that computes the figures.
        freq = pl_module.epoch_figures.get("activation_frequency")
        if freq is None or trainer.sanity_checking:
            return
        for writer in [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_histogram")]:
            writer.add_histogram("val/activation_frequency", freq.float().cpu(), trainer.global_step)

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module):
        if "activation_frequency" in pl_module.epoch_figures:
            publish(trainer, "features", decoder_features(pl_module), self.dir / "features.png")

    @torch.no_grad()
    def on_test_epoch_end(self, trainer, pl_module):
        if pl_module.latent_dim != 2 or not self.scatter_examples or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x, y = fixed_examples(trainer, "test", self.scatter_examples, pl_module.device)
        z = pl_module.encode(x).code.cpu()
        fig, ax = plt.subplots(figsize=(6, 6))
        points = ax.scatter(z[:, 0], z[:, 1], c=y.cpu(), cmap="tab10", s=4)
        fig.colorbar(points, ax=ax, label="label")
        ax.set(xlabel="z₁", ylabel="z₂", title="test-set latent codes")
        self.dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.dir / "latent_scatter.png", dpi=100)
        for writer in image_loggers(trainer):
            writer.add_figure("test/latent_scatter", fig, trainer.global_step)
        plt.close(fig)


def decoder_features(pl_module) -> torch.Tensor:
    """One tile per latent unit: the decoder's output for that unit on alone, minus its output at 0."""
    eye = torch.eye(pl_module.latent_dim, device=pl_module.device)
    base = pl_module.likelihood.mean(pl_module.decode(torch.zeros_like(eye[:1])))
    tiles = pl_module.likelihood.mean(pl_module.decode(eye)) - base
    lo, hi = tiles.flatten(1).min(1).values, tiles.flatten(1).max(1).values
    tiles = (tiles - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(1e-8).view(-1, 1, 1, 1)
    return make_grid(tiles.cpu(), nrow=int(len(tiles) ** 0.5 + 0.999), pad_value=1.0)
