"""Penalties: regularizers of the deterministic code, `(code, jacobian, generator) -> (term, figures)`;
`jacobian` (given only to a penalty that `needs_jacobian`) returns ‖∂code/∂x̃‖²_F per example.

Every term is a per-example sum (over units, or over units and pixels) averaged over the batch, like
the reconstruction, so a weight keeps its meaning when the latent size changes.
"""

from __future__ import annotations

import torch
from torch import nn

from autoenc.model.bottlenecks import Stochastic
from autoenc.model.quantize import VQ
from autoenc.model.ranks import global_batch_mean
from autoenc.util.errors import UserError, is_integer, is_number, require


class Penalty:
    """No penalty (penalty=none); the base of the others."""

    needs = "any code"  # what the penalty needs of the bottleneck, in words (for refusals)
    needs_jacobian = False  # True: called with `jacobian`, the code's Jacobian norm per example
    rate: float | None = None  # the mean rate asked of each unit (KL sparsity's ρ): the bottleneck's figures use it
    per_position = True  # False: it needs one flat code per example (refused with net.latent=grid)

    def __init__(self, weight: float = 0.0):
        require(is_number(weight) and weight >= 0, "penalty.weight", weight, "a number ≥ 0")
        self.weight = weight

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def accepts(self, bottleneck) -> bool:
        """Whether this penalty makes sense on the codes `bottleneck` produces."""
        return True

    def __call__(self, code, jacobian=None, generator=None) -> tuple[torch.Tensor | None, dict]:
        """The weighted term (None: no term) and figures to log; `generator` for any randomness."""
        return None, {}


class L1(Penalty):
    """λ · Σ_j |z_j| per example: drives codes to exactly zero on a ReLU bottleneck (sparse AE)."""

    needs = "a continuous code"
    per_position = False

    def accepts(self, bottleneck):
        return not isinstance(bottleneck, VQ)  # a codebook vector's size is not the encoder's to shrink

    def __init__(self, weight: float = 0.01):
        super().__init__(weight)

    def __call__(self, code, jacobian=None, generator=None):
        return self.weight * code.abs().sum(1).mean(), {}


class KL(Penalty):
    """β · Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the batch-mean rate of unit j (Ng's sparse autoencoder notes)."""

    needs = "rates in [0, 1]"
    per_position = False

    def __init__(self, weight: float = 1.0, rho: float = 0.05):
        super().__init__(weight)
        require(is_number(rho) and 0 < rho < 1, "penalty.rho", rho, "a rate in (0, 1)")
        self.rho = self.rate = rho

    def accepts(self, bottleneck):
        return not isinstance(bottleneck, Stochastic) and bottleneck.bounds[0] >= 0 and bottleneck.bounds[1] <= 1

    def __call__(self, code, jacobian=None, generator=None):
        return self.weight * kl_sparsity(global_batch_mean(code), self.rho), {}


def kl_sparsity(rho_hat: torch.Tensor, rho: float) -> torch.Tensor:
    """Σ_j ρ log(ρ/ρ̂_j) + (1−ρ) log((1−ρ)/(1−ρ̂_j)) between Bernoulli rates."""
    rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


class Contractive(Penalty):
    """λ · ‖∂z/∂x̃‖²_F per example, averaged (Rifai et al. 2011), computed by `method`."""

    needs = "a deterministic, continuous code"
    needs_jacobian = True
    per_position = False

    def __init__(self, weight: float = 0.1, method: str = "auto", projections: int = 1):
        super().__init__(weight)
        require(method in METHODS, "penalty.method", method, "auto, analytic, exact or estimate")
        require(is_integer(projections) and projections >= 1, "penalty.projections", projections, "a positive integer")
        self.method, self.projections = method, projections

    def accepts(self, bottleneck):
        return not isinstance(bottleneck, (Stochastic, VQ))  # a quantized code's Jacobian is zero almost everywhere

    def __call__(self, code, jacobian=None, generator=None):
        sq = jacobian(self.method, self.projections, generator)
        return self.weight * sq.mean(), {"jacobian_fro": sq.detach().clamp_min(0).sqrt().mean()}


METHODS = ("auto", "analytic", "exact", "estimate")


def jacobian_sq(encode, encoder: nn.Module, bottleneck, x: torch.Tensor, code: torch.Tensor, method: str = "auto",
                projections: int = 1, generator=None) -> torch.Tensor:
    """‖∂code/∂x‖²_F per example of `encode` (encoder then bottleneck): in closed form for a one-layer
    encoder, from the full Jacobian, or estimated by random projections; `auto`: closed form where it
    exists, else the estimate."""
    linear = one_linear_layer(encoder)
    method = method if method != "auto" else "analytic" if linear is not None else "estimate"
    with torch.enable_grad():
        if method == "analytic":
            if linear is None:
                raise UserError("penalty.method=analytic needs a one-layer encoder (net=mlp_shallow); "
                                "use penalty.method=exact or estimate")
            return analytic_jacobian_sq(bottleneck.slope(code), linear.weight)
        if method == "exact":
            return exact_jacobian_sq(encode, x)
        return estimated_jacobian_sq(encode, x, projections, generator)


def one_linear_layer(encoder: nn.Module) -> nn.Linear | None:
    """The encoder's only Linear when it is Flatten → Linear (the case with a closed form)."""
    layers = [m for m in encoder if not isinstance(m, nn.Flatten)] if isinstance(encoder, nn.Sequential) else []
    return layers[0] if len(layers) == 1 and isinstance(layers[0], nn.Linear) else None


def analytic_jacobian_sq(slope: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_j s_j² ‖W_j‖² per example for z = s(Wx + b) elementwise, s_j = ∂z_j/∂h_j (Rifai et al. 2011,
    eq. 7 for a sigmoid, where s_j = z_j(1 − z_j))."""
    return (slope ** 2 * (weight ** 2).sum(1)).sum(1)


def exact_jacobian_sq(encode, x: torch.Tensor) -> torch.Tensor:
    """‖J‖²_F per example from the full Jacobian (torch.func), for any encoder."""
    from torch.func import jacrev, vmap

    jac = vmap(jacrev(lambda xi: encode(xi.unsqueeze(0)).squeeze(0)))(x)
    return jac.flatten(1).pow(2).sum(1)


def estimated_jacobian_sq(encode, x: torch.Tensor, projections: int = 1, generator=None) -> torch.Tensor:
    """Unbiased ‖J‖²_F = E_v ‖Jᵀv‖², v ~ N(0, I): one vector-Jacobian product per projection."""
    x = x.detach().requires_grad_(True)
    z = encode(x)
    total = 0.0
    for _ in range(projections):
        v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        (g,) = torch.autograd.grad(z, x, v, create_graph=True)
        total = total + g.flatten(1).pow(2).sum(1)
    return total / projections
