"""Input corruptions for denoising: functions of (batch, generator), run on the batch's device."""

from __future__ import annotations

import torch

from autoenc.util.errors import is_number, require


def _uniform(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)


def gaussian(x: torch.Tensor, g: torch.Generator | None = None, std: float = 0.3, clip: bool = True) -> torch.Tensor:
    """Additive N(0, std²) noise, clipped back to [0, 1] (`clip=false` for unbounded data)."""
    x = x + std * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return x.clamp_(0, 1) if clip else x


def masking(x: torch.Tensor, g: torch.Generator | None = None, p: float = 0.3) -> torch.Tensor:
    """A fraction p of pixels set to 0 (masking noise, Vincent et al. 2008)."""
    return x * (_uniform(x, g) >= p)


def salt_pepper(x: torch.Tensor, g: torch.Generator | None = None, p: float = 0.2) -> torch.Tensor:
    """A fraction p of pixels set to 0 or 1 with equal chance."""
    hit = _uniform(x, g) < p
    return torch.where(hit, (_uniform(x, g) < 0.5).to(x.dtype), x)


class Noise:
    """A corruption with its settings checked once when built: `noise(batch, generator)` (the config groups')."""

    def __call__(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(Noise):
    """gaussian() with a standard deviation ≥ 0 (noise=gaussian)."""

    def __init__(self, std: float = 0.3, clip: bool = True):
        require(is_number(std) and std >= 0, "noise.std", std, "a number ≥ 0")
        self.std, self.clip = std, clip

    def __call__(self, x, g=None):
        return gaussian(x, g, self.std, self.clip)


class Masking(Noise):
    """masking() with a fraction in [0, 1] (noise=masking)."""

    def __init__(self, p: float = 0.3):
        require(is_number(p) and 0 <= p <= 1, "noise.p", p, "a fraction in [0, 1]")
        self.p = p

    def __call__(self, x, g=None):
        return masking(x, g, self.p)


class SaltPepper(Masking):
    """salt_pepper() with a fraction in [0, 1] (noise=salt_pepper)."""

    def __init__(self, p: float = 0.2):
        super().__init__(p)

    def __call__(self, x, g=None):
        return salt_pepper(x, g, self.p)
