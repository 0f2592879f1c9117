"""Input corruptions for denoising: functions of (batch, generator), run on the batch's device."""

from __future__ import annotations

import torch


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
