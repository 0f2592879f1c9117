"""The penalties' math against independent computations: Jacobian norms, KL sparsity, L1, their scale."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian

from autoenc.model.bottlenecks import Gaussian, Linear, ReLU, Sigmoid, TopK
from autoenc.util.errors import UserError
from autoenc.model.penalties import KL, L1, Contractive, Penalty, estimated_jacobian_sq, exact_jacobian_sq, jacobian_sq


def one_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5))


def two_layer_relu() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))


def autograd_jacobian_sq(encoder: nn.Module, bottleneck, x: torch.Tensor) -> torch.Tensor:
    """‖∂z/∂x‖²_F per example, one full Jacobian per example from torch.autograd.functional."""
    return torch.stack([jacobian(lambda xi: bottleneck(encoder(xi.unsqueeze(0))).code.squeeze(0), xi).pow(2).sum()
                        for xi in x])


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(7, 1, 3, 4, generator=torch.Generator().manual_seed(2))


def contractive(encoder, bottleneck, x, **kw):
    code = bottleneck(encoder(x)).code
    jacobian = partial(jacobian_sq, lambda v: bottleneck(encoder(v)).code, encoder, bottleneck, x, code)
    return Contractive(weight=0.5, **kw)(code, jacobian)


@pytest.mark.parametrize("bottleneck", [Sigmoid(), ReLU(), Linear(), TopK(k=2, standardize=0.0)], ids=lambda b: type(b).__name__)
@pytest.mark.parametrize("method", ["analytic", "auto"])
def test_analytic_contractive_equals_squared_frobenius_norm_of_the_jacobian(x, bottleneck, method):
    encoder = one_layer()
    term, stats = contractive(encoder, bottleneck, x, method=method)
    expected = autograd_jacobian_sq(encoder, bottleneck, x)
    assert term.item() == pytest.approx(0.5 * expected.mean().item(), rel=1e-5)
    assert stats["jacobian_fro"].item() == pytest.approx(expected.sqrt().mean().item(), rel=1e-5)


def test_a_standardized_top_k_in_training_has_the_jacobian_of_its_step_with_the_batch_statistics_held():
    """Under `fixed()` the full Jacobian (each example alone, through torch.func) is that of the code the
    step computed, its batch mean and variance constants: the closed form gives the same, and the running
    estimates are not moved a second time."""
    torch.manual_seed(3)
    x = torch.rand(32, 1, 3, 4)
    encoder, bottleneck = one_layer(), TopK(k=2, standardize=0.1)
    bottleneck.setup(5)
    bottleneck.train()
    code = bottleneck(encoder(x)).code
    offset = bottleneck.offset.clone()
    with bottleneck.fixed():
        exact = jacobian_sq(lambda v: bottleneck(encoder(v)).code, encoder, bottleneck, x, code, "exact")
        analytic = jacobian_sq(lambda v: bottleneck(encoder(v)).code, encoder, bottleneck, x, code, "analytic")
    torch.testing.assert_close(exact, analytic)
    assert exact.min() > 0 and torch.equal(bottleneck.offset, offset)


@pytest.mark.parametrize("bottleneck", [Sigmoid(), Linear()], ids=lambda b: type(b).__name__)
def test_exact_contractive_equals_autograd_jacobian_for_a_two_layer_relu_encoder(x, bottleneck):
    encoder = two_layer_relu()
    term, _ = contractive(encoder, bottleneck, x, method="exact")
    expected = autograd_jacobian_sq(encoder, bottleneck, x)
    assert term.item() == pytest.approx(0.5 * expected.mean().item(), rel=1e-5)


def test_analytic_and_exact_give_the_same_gradient_to_the_encoder(x):
    grads = []
    for method in ("analytic", "exact"):
        encoder = one_layer()
        contractive(encoder, Sigmoid(), x, method=method)[0].backward()
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
    with pytest.raises(UserError, match=r"penalty.method=analytic needs a one-layer encoder \(net=mlp_shallow\)"):
        contractive(two_layer_relu(), Sigmoid(), x, method="analytic")


def test_kl_sparsity_equals_the_formula_by_hand():
    rho, beta = 0.1, 0.7
    z = torch.tensor([[0.2, 0.9, 0.05], [0.4, 0.7, 0.15]])
    term, _ = KL(weight=beta, rho=rho)(z)
    by_hand = 0.0
    for rho_hat in (0.3, 0.8, 0.1):
        by_hand += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))
    assert term.item() == pytest.approx(beta * by_hand, rel=1e-5)


def test_kl_sparsity_is_zero_when_the_mean_activation_equals_the_target():
    z = torch.tensor([[0.0, 0.1, 0.05], [0.1, 0.0, 0.05]])  # column means 0.05
    term, _ = KL(weight=1.0, rho=0.05)(z)
    assert term.item() == pytest.approx(0.0, abs=1e-6)


def test_l1_is_a_per_example_sum_averaged_over_the_batch():
    """The scale convention: Σ over units per example, then the batch mean (numpy, by loops)."""
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(6))
    term, _ = L1(weight=0.3)(z)
    by_hand = np.mean([sum(abs(v) for v in row) for row in z.tolist()])
    assert term.item() == pytest.approx(0.3 * by_hand, rel=1e-6)
    # the same code twice as wide, each unit duplicated: twice the term, as for a reconstruction sum
    assert L1(weight=0.3)(torch.cat([z, z], 1))[0].item() == pytest.approx(2 * term.item())


def test_each_penalty_declares_what_it_needs_of_the_bottleneck():
    bottlenecks = {"linear": Linear(), "relu": ReLU(), "sigmoid": Sigmoid(), "topk": TopK(), "gaussian": Gaussian()}
    fits = {type(p).__name__: {k for k, b in bottlenecks.items() if p.accepts(b)}
            for p in (Penalty(), L1(), KL(), Contractive())}
    assert fits == {"Penalty": set(bottlenecks), "L1": set(bottlenecks), "KL": {"sigmoid"},
                    "Contractive": {"linear", "relu", "sigmoid", "topk"}}
