"""Bottlenecks: what turns the encoder's head h into the code z, and what the code brings with it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from autoenc.util.errors import UserError, is_integer, is_number, require
from autoenc.model.ranks import any_over_ranks, global_batch_mean


@dataclass
class Latent:
    """A batch's code: `z` feeds the decoder (a sample where the bottleneck is Stochastic), `code` is the deterministic code."""

    z: torch.Tensor
    code: torch.Tensor
    h: torch.Tensor  # the encoder's head before the bottleneck
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    indices: torch.Tensor | None = None  # a quantized code's codebook entries (bottleneck=vq)


@dataclass
class Pass:
    """What a bottleneck's loss terms may use of one forward pass (not an optimizer step): the clean x, the
    decoder's logits and their reconstruction loss (batch mean), the decoder and the likelihood's
    per-example NLL, and the epochs of training done (None outside training)."""

    x: torch.Tensor
    logits: torch.Tensor
    recon: torch.Tensor
    decode: Callable[[torch.Tensor], torch.Tensor]
    nll: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    progress: float | None = None


class Bottleneck(nn.Module):
    """Turns the encoder's head h into the code, and says what the code brings with it. A subclass needs
    nothing but its class: every hook below has a default (an identity code with no loss term). The hooks
    it may override: `head_dim` (how wide h is), `setup` (state sized by the code), `activation` and its
    `slope` (an elementwise code), `forward` (anything else, e.g. sampling), `fires_above`/`active` (when
    a unit fires), `terms` (its loss term and figures), `split_figures`, `active_size` (the linear
    baseline's size), `fixed` (batch statistics held for a Jacobian), `scores` (extra per-example scores).
    A code sampled from a posterior with a prior is a `Stochastic` bottleneck."""

    bounds = (-math.inf, math.inf)  # the values a code can take; penalties check what they need
    per_position = False  # whether it can act on a code vector at each position of a grid (net.latent=grid)

    def __init__(self, threshold: float | None = None):
        super().__init__()
        require(threshold is None or is_number(threshold), "bottleneck.threshold", threshold, "null or a number")
        self.threshold = threshold  # a unit is active on an example when its code exceeds this
        self.rate: float | None = None  # the mean rate a penalty asks of each unit (KL sparsity's ρ), if any

    def fires_above(self) -> float | None:
        """The value a unit's code must exceed to fire (None: the code has no notion of firing)."""
        return self.threshold

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def head_dim(self, latent_dim: int) -> int:
        """How wide the encoder's head must be for a code of latent_dim units."""
        return latent_dim

    def setup(self, latent_dim: int, grid: tuple[int, ...] = ()) -> None:
        """Called once the code's size is known: latent_dim values (at each position of `grid`, () when flat)."""

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def active_size(self, size: int) -> int:
        """How many of a code's `size` values can be non-zero: the size of the linear baseline (PCA) to compare with."""
        return size

    def slope(self, code: torch.Tensor) -> torch.Tensor:
        """∂code_j/∂h_j as a function of the code (the diagonal of an elementwise activation's Jacobian)."""
        return torch.ones_like(code)

    def forward(self, h: torch.Tensor, generator: torch.Generator | None = None) -> Latent:
        code = self.activation(h)
        return Latent(code, code, h)

    def active(self, code: torch.Tensor) -> torch.Tensor | None:
        """Which units fire on each example, or None where the code has no such notion."""
        cut = self.fires_above()
        return None if cut is None else code > cut

    def terms(self, latent: Latent, pass_: Pass) -> tuple[torch.Tensor | None, dict]:
        """The (weighted) term this bottleneck adds to the loss (None: none), and its named parts and
        figures (per-example means)."""
        active = self.active(latent.code)
        return None, {} if active is None else {"l0": active.flatten(1).sum(1).float().mean()}

    def tally(self, latent: Latent) -> dict[str, torch.Tensor]:
        """Sums over a batch that `split_figures` needs beyond the code's own (n, sum, sq): how often each
        unit fires."""
        active = self.active(latent.code)
        return {} if active is None else {"active": active.float().sum(0)}

    def split_figures(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Figures over a whole split from summed code statistics (n, sum, sq, active): a unit is dead when it
        never fires on the split (never exceeds `dead_threshold`, logged with it); under a target rate ρ,
        the achieved mean rate against it."""
        figures = {}
        if self.rate is not None:
            rate = stats["sum"] / stats["n"]
            figures |= {"mean_rate": rate.mean(), "target_rate": rate.new_tensor(self.rate)}
        if "active" not in stats:
            return figures
        freq = stats["active"] / stats["n"]
        return {**figures, "dead_fraction": (freq == 0).float().mean(),
                "dead_threshold": freq.new_tensor(self.fires_above()), "activation_frequency": freq}

    @contextmanager
    def fixed(self):
        """Within: batch statistics (where a bottleneck has them) stay those of the last training batch, so
        that a per-example Jacobian is that of the code function this step used."""
        yield

    score_names: tuple[str, ...] = ()  # what `scores` returns

    def scores(self, autoencoder, x: torch.Tensor, k: int, generator=None, chunk: int = 100,
               y=None) -> dict[str, torch.Tensor]:
        """Per-example scores of x this code gives beyond the reconstruction's (none here)."""
        return {}


class Stochastic(Bottleneck, ABC):
    """A code sampled from a posterior q(z|x) with a prior p(z): what prior samples, the importance-sampled
    likelihood bound (IWAE) and its per-example score need. Subclasses give both samplers."""

    @abstractmethod
    def prior_sample(self, n: int, generator=None, device=None) -> torch.Tensor:
        """n codes from the prior p(z)."""

    @abstractmethod
    def importance_samples(self, h: torch.Tensor, n: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws z ~ q(z|x) per example, shape (n, B, d), and log p(z) − log q(z|x), shape (n, B)."""

    score_names = ("nll_iwae",)

    def scores(self, autoencoder, x, k, generator=None, chunk=100, y=None):
        """−log p(x) per example (given y), the IWAE estimate with k importance samples."""
        return {"nll_iwae": -autoencoder.log_likelihood(x, k, generator, chunk, y)}


class Linear(Bottleneck):
    """z = h: an unconstrained code (the undercomplete autoencoder's)."""

    per_position = True


class ReLU(Bottleneck):
    """z = max(h, 0): codes that can be exactly zero (with penalty=l1, a sparse autoencoder)."""

    bounds = (0.0, math.inf)

    def __init__(self, threshold: float | None = 0.0):
        super().__init__(threshold)

    def activation(self, h):
        return torch.relu(h)

    def slope(self, code):
        return (code > 0).to(code.dtype)


class Sigmoid(Bottleneck):
    """z = sigmoid(h): rates in [0, 1] (KL sparsity; Rifai et al.'s contractive encoder). A unit fires above
    `threshold`; when null, above the penalty's target rate ρ (a dead unit never reaches the rate it is
    asked to average), 0.1 without one."""

    bounds = (0.0, 1.0)

    def __init__(self, threshold: float | None = None):
        super().__init__(threshold)

    def fires_above(self):
        return self.threshold if self.threshold is not None else self.rate if self.rate is not None else 0.1

    def activation(self, h):
        return torch.sigmoid(h)

    def slope(self, code):
        return code * (1 - code)


class TopK(ReLU):
    """The k largest of h per example, then ReLU; the rest zero (Makhzani & Frey 2013; Gao et al. 2024).
    AuxK (Gao et al. 2024, sec. 2.4): units that have not fired for `dead_window` training steps are
    dead; the aux_k largest of their pre-activations form an auxiliary code that must reconstruct the
    residual the live code leaves, with weight `aux_coef`, which gives dead units gradient again.
    `standardize` (a momentum; 0: off): the k are chosen by h standardized per unit, by the global batch's
    mean and variance in training (as batch normalization does, gradient included) and by running
    estimates with this momentum elsewhere, and each chosen unit's code is its h less that mean, ReLU'd:
    no unit wins or loses every example by its offset or spread, and the code keeps its scale (README:
    dead units)."""

    def __init__(self, k: int = 8, threshold: float | None = 0.0, aux_k: int | None = None,
                 aux_coef: float = 0.0, dead_window: int = 20, standardize: float = 0.1):
        super().__init__(threshold)
        require(is_integer(k) and k >= 1, "bottleneck.k", k, "an integer from 1 to model.latent_dim")
        require(is_number(standardize) and 0 <= standardize <= 1, "bottleneck.standardize", standardize,
                "a momentum in [0, 1] (0: off)")
        self.k, self.aux_k, self.aux_coef, self.dead_window = k, aux_k, aux_coef, dead_window
        self.standardize, self.frozen_moments = standardize, None

    def setup(self, latent_dim, grid=()):
        require(self.k <= latent_dim, "bottleneck.k", self.k, "an integer from 1 to model.latent_dim")
        # steps since each unit last fired in training (a buffer: checkpoints keep it, resume is exact)
        self.register_buffer("since_fired", torch.zeros(latent_dim, dtype=torch.long))
        if self.standardize:  # each unit's running mean and variance of h (only where used)
            self.register_buffer("offset", torch.zeros(latent_dim))
            self.register_buffer("variance", torch.ones(latent_dim))
            self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self, h, generator=None):
        if not self.standardize:
            code = self.activation(h)
            return Latent(code, code, h)
        mean, variance = self.frozen_moments or self.moments(h)
        self.last = mean.detach(), variance.detach()
        centered = h - mean
        top = (centered / (variance + 1e-5).sqrt()).topk(self.k, dim=1).indices
        code = torch.zeros_like(h).scatter(1, top, torch.relu(centered.gather(1, top)))
        return Latent(code, code, centered)

    def moments(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's mean and (biased) variance of h: the global batch's in training, which the running
        estimates follow (the first batch sets them), else the running estimates."""
        if not self.training or len(h) < 2:  # (one example has no spread to standardize by)
            return self.offset.to(h.dtype), self.variance.to(h.dtype)
        mean = global_batch_mean(h)
        variance = global_batch_mean((h - mean).pow(2))
        with torch.no_grad():
            keep = self.standardize if self.started else 1.0
            self.offset.lerp_(mean.detach().float(), keep)
            self.variance.lerp_(variance.detach().float(), keep)
            self.started.fill_(True)
        return mean, variance

    @contextmanager
    def fixed(self):
        self.frozen_moments = getattr(self, "last", None) if self.training else None
        try:
            yield
        finally:
            self.frozen_moments = None

    def terms(self, latent, pass_):
        extra, figures = super().terms(latent, pass_)
        z_aux = self.auxiliary(latent) if pass_.progress is not None and self.aux_coef else None
        if z_aux is None:
            return extra, figures
        # AuxK: the auxiliary code's decoding, added to the code's, must explain the rest of x; only the
        # auxiliary code and the decoder's part for it get gradient (Gao et al. 2024, eq. 2)
        aux_logits = pass_.logits.detach() + pass_.decode(z_aux) - pass_.decode(torch.zeros_like(z_aux))
        auxk = pass_.nll(aux_logits, pass_.x).mean()
        return self.aux_coef * auxk, {**figures, "auxk": auxk}

    def auxiliary(self, latent: Latent) -> torch.Tensor | None:
        """Counts each unit's training steps since it last fired; the aux_k largest pre-activations of the
        dead ones as a code (None while no unit is dead)."""
        with torch.no_grad():
            fired = (latent.code > 0).any(0)
            any_over_ranks(fired)
            self.since_fired.add_(1).masked_fill_(fired, 0)
            dead = self.since_fired >= self.dead_window
        if not dead.any():
            return None
        k = min(self.aux_k or len(dead) // 2, int(dead.sum()))
        top = latent.h.masked_fill(~dead, float("-inf")).topk(k, dim=1)
        # no ReLU here: a unit pushed far below zero still gets the gradient that brings it back
        return torch.zeros_like(latent.h).scatter(1, top.indices, top.values)

    def active_size(self, size):
        return self.k

    def activation(self, h):
        top = h.topk(self.k, dim=1)
        return torch.zeros_like(h).scatter(1, top.indices, torch.relu(top.values))


class Gaussian(Stochastic):
    """q(z|x) = N(μ, diag σ²) from a head of twice the latent width; z = μ + σ·ε in every loss
    (reparameterization, Kingma & Welling 2014), μ as the deterministic code; adds β·KL(q ‖ N(0, I))."""


    per_position = True

    def __init__(self, beta: float = 1.0, warmup_epochs: float = 0.0):
        super().__init__(None)
        require(is_number(beta) and beta >= 0, "bottleneck.beta", beta, "a number ≥ 0")
        require(is_number(warmup_epochs) and warmup_epochs >= 0, "bottleneck.warmup_epochs", warmup_epochs, "a number ≥ 0")
        self.beta, self.warmup_epochs = beta, warmup_epochs
        self.code_shape: tuple[int, ...] = ()

    def head_dim(self, latent_dim):
        return 2 * latent_dim

    def setup(self, latent_dim, grid=()):
        self.code_shape = (latent_dim, *grid)

    def forward(self, h, generator=None):
        mean, logvar = h.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return Latent(mean + torch.exp(0.5 * logvar) * eps, mean, h, mean, logvar)

    def beta_at(self, progress: float | None) -> float:
        """β, ramped linearly from 0 over the first `warmup_epochs` epochs of training (else β)."""
        if progress is None or self.warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, progress / self.warmup_epochs)

    def terms(self, latent, pass_):
        kl = gaussian_kl(latent.mean, latent.logvar).mean()
        beta = self.beta_at(pass_.progress)
        stats = {"kl": kl, "nelbo": pass_.recon + kl}
        if pass_.progress is not None:
            stats["beta"] = kl.new_tensor(beta)
        return beta * kl, stats

    def split_figures(self, stats):
        # Active units: dimensions whose posterior mean varies over the data, Cov_x(E_q[z_i]) > 0.01
        # (Burda et al. 2015, sec. 5.2).
        var = stats["sq"] / stats["n"] - (stats["sum"] / stats["n"]) ** 2
        return {"active_units": (var > 0.01).sum().float()}

    def prior_sample(self, n, generator=None, device=None):
        return torch.randn(n, *self.code_shape, generator=generator, device=device)

    def importance_samples(self, h, n, generator=None):
        mean, logvar = h.chunk(2, dim=1)
        eps = torch.randn(n, *mean.shape, generator=generator, device=h.device, dtype=h.dtype)
        z = mean + torch.exp(0.5 * logvar) * eps
        log_w = log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mean, logvar)
        return z, log_w.flatten(2).sum(-1)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) per example = ½ Σ (μ² + σ² − log σ² − 1) (Kingma & Welling 2014, app. B), summed
    over the whole code (every position of a grid)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(1)


def log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, σ²) of each value."""
    return -0.5 * ((z - mean).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi))
