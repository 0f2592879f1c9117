"""Latent penalties: callables `(z, x_tilde, encoder) -> (weighted term, stats)`, with a code map."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from autoenc.errors import UserError

Encode = Callable[[torch.Tensor], torch.Tensor]


class Penalty:
    """Base: no term; `code` maps the encoder's head output to the latent code (identity here)."""

    def __init__(self, weight: float = 0.0):
        self.weight = weight

    def code(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def __call__(self, z, x_tilde, encoder: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return z.new_zeros(()), {}


class Sparsity(Penalty):
    """A sparsity penalty; a unit is active on an example when its code exceeds `threshold`."""

    def __init__(self, weight: float = 0.0, threshold: float = 0.0):
        super().__init__(weight)
        self.threshold = threshold

    def active(self, z: torch.Tensor) -> torch.Tensor:
        return z.abs() > self.threshold

    def term(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(())

    def __call__(self, z, x_tilde, encoder):
        return self.weight * self.term(z), {"l0": self.active(z).sum(1).float().mean()}


class L1(Sparsity):
    """λ · mean |z| on ReLU codes, which lets units be exactly zero."""

    def code(self, h):
        return torch.relu(h)

    def term(self, z):
        return z.abs().mean()


class KL(Sparsity):
    """β · Σ_j KL(ρ ‖ ρ̂_j) on sigmoid units, ρ̂_j the batch-mean activation (Ng's sparse AE notes)."""

    def __init__(self, weight: float = 1.0, rho: float = 0.05, threshold: float = 0.1):
        super().__init__(weight, threshold)
        self.rho = rho

    def code(self, h):
        return torch.sigmoid(h)

    def term(self, z):
        return kl_sparsity(z.mean(0), self.rho)


def kl_sparsity(rho_hat: torch.Tensor, rho: float) -> torch.Tensor:
    """Σ_j ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j)) between Bernoulli rates."""
    rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class TopK(Sparsity):
    """Keeps the k largest codes of each example and zeroes the rest (Makhzani & Frey 2013); no term."""

    def __init__(self, k: int = 8):
        super().__init__(0.0, 0.0)
        self.k = k

    def code(self, h):
        top = h.topk(self.k, dim=1)
        return torch.zeros_like(h).scatter(1, top.indices, top.values)

    def active(self, z):
        return z != 0


class Contractive(Penalty):
    """λ · ‖∂z/∂x̃‖²_F per example, averaged (Rifai et al. 2011), computed by `method`."""

    def __init__(self, weight: float = 0.1, method: str = "auto", projections: int = 1,
                 sigmoid: bool = True):
        super().__init__(weight)
        self.method, self.projections, self.sigmoid = method, projections, sigmoid

    def code(self, h):
        return torch.sigmoid(h) if self.sigmoid else h

    def __call__(self, z, x_tilde, encoder):
        method = self.method
        linear = one_linear_layer(encoder)

        def encode(x):
            return self.code(encoder(x))

        if method == "auto":
            method = "analytic" if linear is not None and self.sigmoid else "estimate"
        with torch.enable_grad():
            if method == "analytic":
                if linear is None or not self.sigmoid:
                    raise UserError("penalty.method=analytic needs a one-layer sigmoid encoder "
                                     "(net.hidden=[]); use exact or estimate")
                sq = analytic_jacobian_sq(z, linear.weight)
            elif method == "exact":
                sq = exact_jacobian_sq(encode, x_tilde)
            else:
                sq = estimated_jacobian_sq(encode, x_tilde, self.projections)
        return self.weight * sq.mean(), {"jacobian_fro": sq.detach().clamp_min(0).sqrt().mean()}


def one_linear_layer(encoder: nn.Module) -> nn.Linear | None:
    """The encoder's only Linear when it is Flatten → Linear (the case with a closed form)."""
    layers = [m for m in encoder if not isinstance(m, nn.Flatten)] if isinstance(encoder, nn.Sequential) else []
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def analytic_jacobian_sq(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j (h_j(1−h_j))² ‖W_j‖² for h = sigmoid(Wx + b), per example (Rifai et al. 2011, eq. 7)."""
    return ((h * (1 - h)) ** 2 * (weight ** 2).sum(1)).sum(1)


def exact_jacobian_sq(encode: Encode, x: torch.Tensor) -> torch.Tensor:
    """‖J‖²_F per example from the full Jacobian (torch.func), for any encoder."""
    from torch.func import jacrev, vmap

    jac = vmap(jacrev(lambda xi: encode(xi.unsqueeze(0)).squeeze(0)))(x)
    return jac.flatten(1).pow(2).sum(1)


def estimated_jacobian_sq(encode: Encode, x: torch.Tensor, projections: int = 1) -> torch.Tensor:
    """Unbiased ‖J‖²_F = E_v ‖Jᵀv‖², v ~ N(0, I): one vector-Jacobian product per projection."""
    x = x.detach().requires_grad_(True)
    z = encode(x)
    total = 0.0
    for _ in range(projections):
        v = torch.randn_like(z)
        (g,) = torch.autograd.grad(z, x, v, create_graph=True)
        total = total + g.flatten(1).pow(2).sum(1)
    return total / projections
