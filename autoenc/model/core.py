"""Autoencoder, a plain nn.Module: x ─noise→ x̃ ─encoder→ h ─bottleneck→ z ─decoder→ logits ─likelihood→ x̂."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from autoenc.model.bottlenecks import Bottleneck, Latent, Linear, Pass, Stochastic
from autoenc.model.conditions import Condition
from autoenc.util.errors import UserError, is_number, require
from autoenc.model.likelihoods import Bernoulli
from autoenc.model.penalties import Penalty, jacobian_sq


@dataclass
class Output:
    """One pass of the pipeline: the code, the decoder's logits, the loss and its named parts (per-example
    sums averaged over the batch, each from the seam that owns it) with the figures those seams report."""

    latent: Latent
    logits: torch.Tensor
    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Autoencoder(nn.Module):
    """The one pipeline of every family; noise, bottleneck, penalty and likelihood are its seams, the
    backbone `net(shape, latent_dim, head_dim)` gives the encoder and decoder. Training it needs no
    Lightning: `out = model(x, model.corrupt(x, g)); out.loss.backward()`."""

    def __init__(self, net, shape, latent_dim: int = 16, bottleneck: Bottleneck | None = None,
                 likelihood: nn.Module | None = None, noise=None, penalty: Penalty | None = None,
                 weight_penalty: float = 0.0, condition: Condition | None = None):
        super().__init__()
        require(isinstance(latent_dim, int) and not isinstance(latent_dim, bool) and latent_dim >= 1,
                "model.latent_dim", latent_dim, "a positive integer")
        require(is_number(weight_penalty) and weight_penalty >= 0, "model.weight_penalty", weight_penalty, "a number ≥ 0")
        self.weight_penalty = weight_penalty
        self.shape, self.latent_dim = tuple(shape), latent_dim
        self.bottleneck = bottleneck if bottleneck is not None else Linear()
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self.condition = condition or Condition()
        head_dim, k = self.bottleneck.head_dim(latent_dim), self.condition.width
        self.encoder, self.decoder = net(shape=self.shape, latent_dim=latent_dim, head_dim=head_dim)
        if k:  # the condition: extra input channels (or features) of the encoder, extra code channels of the decoder
            self.encoder, _ = net(shape=(self.shape[0] + k, *self.shape[1:]), latent_dim=latent_dim, head_dim=head_dim)
            _, self.decoder = net(shape=self.shape, latent_dim=latent_dim + k, head_dim=head_dim)
        self.grid = self._grid()
        self.noise, self.penalty = noise, penalty or Penalty()
        if self.grid and not (self.bottleneck.per_position and self.penalty.per_position):
            flat = f"bottleneck={self.bottleneck.name}" if not self.bottleneck.per_position else f"penalty={self.penalty.name}"
            raise UserError(f"{flat} needs one flat code per example, but net.latent=grid gives a "
                            f"{'×'.join(map(str, self.grid))} grid of codes; use net.latent=flat, or bottleneck=linear, "
                            "gaussian or vq without a penalty")
        self.bottleneck.setup(latent_dim, self.grid)
        if not self.penalty.accepts(self.bottleneck):
            raise UserError(f"penalty={self.penalty.name} needs {self.penalty.needs}, which "
                            f"bottleneck={self.bottleneck.name} does not give")
        self.bottleneck.rate = self.penalty.rate

    def _grid(self) -> tuple[int, ...]:
        """The positions of the encoder's code (H, W) when it is a feature map, () when it is one vector: from
        one pass of an empty example (in eval mode, so no norm's statistics move)."""
        training = self.encoder.training
        with torch.no_grad():
            h = self.encoder.eval()(torch.zeros(1, self.shape[0] + self.condition.width, *self.shape[1:]))
        self.encoder.train(training)
        return tuple(h.shape[2:])

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One example's code: (latent_dim,) or (latent_dim, H, W) on a grid."""
        return (self.latent_dim, *self.grid)

    @property
    def code_size(self) -> int:
        """How many values one example's code has (a grid's, flattened)."""
        return math.prod(self.code_shape)

    def corrupt(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The encoder's input x̃: x with this model's noise (x itself without one)."""
        return x if self.noise is None else self.noise(x, generator)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, y=None) -> Latent:
        """The code of x (given labels y, for a conditional model)."""
        return self.bottleneck(self.encoder(self.condition.join(x, self.condition.vector(y, len(x)))), generator)

    def decode(self, z: torch.Tensor, y=None) -> torch.Tensor:
        """Logits of codes z (given labels y, for a conditional model); the likelihood owns the output activation.
        z is taken in the weights' type: codes made outside a step (prior samples, a grid, unit vectors) are
        float32 where a `-true` precision keeps the weights in another."""
        weight = next(self.decoder.parameters(), None)
        z = z if weight is None else z.to(weight.dtype)
        return self.decoder(self.condition.join(z, self.condition.vector(y, len(z))))

    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """x̂ from the deterministic code (the posterior mean where there is one)."""
        return self.likelihood.mean(self.decode(self.encode(x, y=y).code, y))

    def forward(self, x: torch.Tensor, x_tilde: torch.Tensor | None = None, progress: float | None = None,
                generator: torch.Generator | None = None, y=None) -> Output:
        """The loss of reconstructing the clean x from x̃ (default x), and its parts. `progress`: epochs of
        training done (the bottleneck's warm-up and AuxK act only in training, where it is given);
        `generator`: the randomness of sampling and of estimated penalties; `y`: a conditional model's labels."""
        x_tilde = x if x_tilde is None else x_tilde
        c = self.condition.vector(y, len(x))  # made once for the encoder and every decoding of this pass
        latent = self.bottleneck(self.encoder(self.condition.join(x_tilde, c)), generator)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return self.decoder(self.condition.join(z, c))

        logits = decode(latent.z)
        recon = self.likelihood.nll(logits, x).mean()
        extra, terms = self.bottleneck.terms(latent, Pass(x, logits, recon, decode, self.likelihood.nll, progress))
        jacobian = partial(self.jacobian_sq, x_tilde, latent.code, y=y) if self.penalty.needs_jacobian else None
        penalty, figures = self.penalty(latent.code, jacobian=jacobian, generator=generator)
        decay = self.weight_penalty / 2 * sum(w.pow(2).sum() for w in self.weights()) if self.weight_penalty else None
        loss = recon
        for term in (extra, penalty, decay):  # only the terms that exist: no zeros added on every step
            loss = loss if term is None else loss + term
        parts = {"loss": loss, "recon": recon, **({} if penalty is None else {"penalty": penalty}),
                 **({} if decay is None else {"weight_penalty": decay})}
        return Output(latent, logits, loss, {**parts, **terms, **figures})

    def weights(self) -> list[torch.Tensor]:
        """The weight matrices and kernels of the encoder and decoder (as the layers use them), without
        biases, norms' scales or the likelihood's σ: what model.weight_penalty acts on."""
        return [m.weight for m in (*self.encoder.modules(), *self.decoder.modules())
                if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2]

    def jacobian_sq(self, x: torch.Tensor, code: torch.Tensor, method: str = "auto", projections: int = 1,
                    generator: torch.Generator | None = None, y=None) -> torch.Tensor:
        """‖∂code/∂x‖²_F per example (code: this model's code of x), by `method` (penalties.jacobian_sq)."""
        with self.bottleneck.fixed():
            return jacobian_sq(lambda v: self.encode(v, y=y).code, self.encoder, self.bottleneck, x, code, method,
                               projections, generator)

    # ---- what a Stochastic bottleneck brings: prior samples and the IWAE bound -------------
    def stochastic(self, lacks: str, then: str = "") -> Stochastic:
        """The bottleneck, where it has a prior and a posterior; else one line: what it `lacks` and what `then`."""
        if not isinstance(self.bottleneck, Stochastic):
            raise UserError(f"bottleneck={self.bottleneck.name} has {lacks}; it needs a bottleneck with a prior "
                            f"and a posterior, such as bottleneck=gaussian (model=vae){then}")
        return self.bottleneck

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y=None) -> torch.Tensor:
        """n examples decoded from prior samples z ~ p(z) (a Stochastic bottleneck only), with labels y (one
        for all, or one each) for a conditional model."""
        device = next(self.parameters()).device
        prior = self.stochastic("no prior to sample from", "; try reconstruct or interpolate").prior_sample
        return self.likelihood.mean(self.decode(prior(n, generator, device), y))

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None,
                       chunk: int = 100, y=None) -> torch.Tensor:
        """IWAE estimate of log p(x) per example (given labels y, for a conditional model) with k importance
        samples (Burda et al. 2015, eq. 8), decoding `chunk` samples at a time."""
        bottleneck = self.stochastic("no posterior and prior, so no likelihood bound (log_likelihood, IWAE)")
        c = self.condition.vector(y, len(x))
        wide = torch.promote_types(x.dtype, torch.float32)  # the bound in float32 at least, under any precision
        h = self.encoder(self.condition.join(x, c)).to(wide)
        parts = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            z, log_w = bottleneck.importance_samples(h, n, generator)  # (n, B, d), log p(z) − log q(z|x)
            z = z.flatten(0, 1).to(x.dtype)  # the decoder's input in the precision's dtype
            logits = self.decoder(self.condition.join(z, None if c is None else c.repeat(n, 1))).to(wide)
            log_px = -self.likelihood.nll(logits, x.repeat(n, *[1] * (x.dim() - 1))).view(n, -1)
            parts.append(log_px + log_w)
        return torch.logsumexp(torch.cat(parts), 0) - math.log(k)
