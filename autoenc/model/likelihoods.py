"""Likelihoods p(x | z) of the decoder's logits: the reconstruction loss and the output activation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from autoenc.util.errors import is_number, require


class Bernoulli(nn.Module):
    """p(x|z) = Bernoulli(sigmoid(logits)): binary cross-entropy, also the usual loss for [0, 1] pixels."""

    bounds = (0.0, 1.0)  # the values it can model (None: any)

    def nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per example, summed over pixels (nats)."""
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


class Gaussian(nn.Module):
    """p(x|z) = N(mean(logits), σ²) per pixel; σ fixed by `sigma`, or one learned scalar when None.
    The mean is sigmoid(logits) for [0, 1] pixels, or the logits themselves with `bounded=false`."""

    def __init__(self, sigma: float | None = None, bounded: bool = True):
        super().__init__()
        require(sigma is None or (is_number(sigma) and sigma > 0), "likelihood.sigma", sigma, "null (learned) or a number > 0")
        self.bounded, self.bounds = bounded, (0.0, 1.0) if bounded else None
        log_sigma = torch.tensor(math.log(sigma) if sigma else 0.0)
        if sigma is None:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    def nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z2 = ((x - self.mean(logits)) * torch.exp(-self.log_sigma)) ** 2
        return (0.5 * z2 + self.log_sigma + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.bounded else logits


class SquaredError(nn.Module):
    """Σ (x − logits)² per example: plain MSE training (a Gaussian of fixed σ = 1/√2 up to a constant),
    for unbounded values such as embeddings or standardized tabular data; the output is the logits."""

    bounds = None

    def nll(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x - logits).pow(2).flatten(1).sum(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


class Auto:
    """likelihood=auto: the `bounded` likelihood's config for data in [0, 1], else the `unbounded` one's,
    decided from the training split's range (runs.build resolves it before anything is built)."""

    def __init__(self, bounded, unbounded):
        self.bounded, self.unbounded = bounded, unbounded

    def choose(self, value_range: tuple[float, float]):
        lo, hi = value_range
        return self.bounded if 0.0 <= lo and hi <= 1.0 else self.unbounded
