"""The penalties' math against independent computations: Jacobian norms, KL sparsity, top-k, L1."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from autoenc.errors import UserError
from autoenc.penalties import KL, L1, Contractive, TopK, estimated_jacobian_sq, exact_jacobian_sq


def one_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def two_layer_relu() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))


def autograd_jacobian_sq(encoder: nn.Module, x: torch.Tensor, sigmoid: bool = True) -> torch.Tensor:
    """‖∂z/∂x‖²_F per example, one full Jacobian per example from torch.autograd.functional."""
    def encode(xi):
        h = encoder(xi.unsqueeze(0)).squeeze(0)
        return torch.sigmoid(h) if sigmoid else h

    return torch.stack([jacobian(encode, xi).pow(2).sum() for xi in x])


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(7, 1, 3, 4, generator=torch.Generator().manual_seed(2))


def contractive(encoder, x, **kw):
    penalty = Contractive(weight=0.5, **kw)
    return penalty(penalty.code(encoder(x)), x, encoder)


@pytest.mark.parametrize("method", ["analytic", "auto"])
def test_analytic_contractive_equals_squared_frobenius_norm_of_the_jacobian(x, method):
    encoder = one_layer()
    term, stats = contractive(encoder, x, method=method)
    expected = autograd_jacobian_sq(encoder, x)
    assert term.item() == pytest.approx(0.5 * expected.mean().item(), rel=1e-5)
    assert stats["jacobian_fro"].item() == pytest.approx(expected.sqrt().mean().item(), rel=1e-5)


@pytest.mark.parametrize("sigmoid", [True, False])
def test_exact_contractive_equals_autograd_jacobian_for_a_two_layer_relu_encoder(x, sigmoid):
    encoder = two_layer_relu()
    term, _ = contractive(encoder, x, method="exact", sigmoid=sigmoid)
    expected = autograd_jacobian_sq(encoder, x, sigmoid)
    assert term.item() == pytest.approx(0.5 * expected.mean().item(), rel=1e-5)


def test_analytic_and_exact_give_the_same_gradient_to_the_encoder(x):
    grads = []
    for method in ("analytic", "exact"):
        encoder = one_layer()
        contractive(encoder, x, method=method)[0].backward()
        grads.append(encoder[1].weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_estimator_mean_over_many_projections_is_within_a_few_percent_of_exact(x):
    encoder = two_layer_relu()

    def encode(xi):
        return torch.sigmoid(encoder(xi))

    torch.manual_seed(3)
    exact = exact_jacobian_sq(encode, x).detach()
    estimate = estimated_jacobian_sq(encode, x, projections=4000).detach()
    assert estimate.mean().item() == pytest.approx(exact.mean().item(), rel=0.03)
    torch.testing.assert_close(estimate, exact, rtol=0.1, atol=0)
    one = estimated_jacobian_sq(encode, x, projections=1).detach()
    assert not torch.allclose(one, exact, rtol=0.01)  # a single projection is noisy, not exact


def test_analytic_on_a_deep_encoder_is_a_user_error(x):
    with pytest.raises(UserError, match=r"penalty.method=analytic needs a one-layer sigmoid encoder"):
        contractive(two_layer_relu(), x, method="analytic")


def test_kl_sparsity_equals_the_formula_by_hand():
    rho, beta = 0.1, 0.7
    z = torch.tensor([[0.2, 0.9, 0.05], [0.4, 0.7, 0.15]])
    term, _ = KL(weight=beta, rho=rho)(z, None, None)
    by_hand = 0.0
    for rho_hat in (0.3, 0.8, 0.1):
        by_hand += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert term.item() == pytest.approx(beta * by_hand, rel=1e-5)


def test_kl_sparsity_is_zero_when_the_mean_activation_equals_the_target():
    z = torch.tensor([[0.0, 0.1, 0.05], [0.1, 0.0, 0.05]])  # column means 0.05
    term, stats = KL(weight=1.0, rho=0.05, threshold=0.5)(z, None, None)
    assert term.item() == pytest.approx(0.0, abs=1e-6)
    assert stats["l0"].item() == 0  # no sigmoid unit above the 0.5 threshold


def test_topk_keeps_exactly_k_largest_codes_per_row():
    h = torch.randn(32, 20, generator=torch.Generator().manual_seed(4))
    penalty = TopK(k=3)
    z = penalty.code(h)
    assert ((z != 0).sum(1) == 3).all()
    kept = z.masked_select(z != 0).view(32, 3).sort(1).values
    torch.testing.assert_close(kept, h.topk(3, dim=1).values.sort(1).values)
    term, stats = penalty(z, None, None)
    assert term.item() == 0 and stats["l0"].item() == 3


def test_l1_is_weight_times_mean_absolute_code_of_relu_units():
    h = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    penalty = L1(weight=0.5)
    z = penalty.code(h)
    term, stats = penalty(z, None, None)
    assert term.item() == pytest.approx(0.5 * (2 + 3) / 4)
    assert stats["l0"].item() == 1
