"""Bottlenecks against independent computations: activations and their slopes, top-k, the Gaussian's KL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian
from torch.distributions import Normal, kl_divergence

from autoenc.model.bottlenecks import Latent, Pass, Gaussian, Linear, ReLU, Sigmoid, Stochastic, TopK, gaussian_kl

H = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
DETERMINISTIC = [Linear(), ReLU(), Sigmoid(), TopK(k=3, standardize=0.0)]


@pytest.mark.parametrize("bottleneck", DETERMINISTIC, ids=lambda b: type(b).__name__)
def test_slope_is_the_diagonal_of_the_autograd_jacobian(bottleneck):
    """The analytic contractive penalty relies on ∂code/∂h being diagonal with entries slope(code)."""
    for h in H:
        jac = jacobian(lambda v: bottleneck(v.unsqueeze(0)).code.squeeze(0), h)
        code = bottleneck(h.unsqueeze(0)).code.squeeze(0)
        torch.testing.assert_close(jac, torch.diag(bottleneck.slope(code)))


def test_activations_and_their_ranges():
    assert torch.equal(Linear()(H).code, H)
    assert torch.equal(ReLU()(H).code, H.clamp_min(0))
    s = Sigmoid()(H * 50).code
    assert 0 <= s.min() and s.max() <= 1 and torch.allclose(Sigmoid()(H).code, 1 / (1 + torch.exp(-H)))
    for b in DETERMINISTIC:
        latent = b(H)
        assert latent.z is latent.code and not isinstance(b, Stochastic) and b.head_dim(7) == 7
        lo, hi = b.bounds
        assert lo <= latent.code.min() and latent.code.max() <= hi


def test_topk_keeps_the_k_largest_then_relu():
    h = torch.randn(64, 20, generator=torch.Generator().manual_seed(4)) - 1.0  # many negative top values
    z = TopK(k=3, standardize=0.0)(h).code
    for row, out in zip(h, z):
        largest = set(row.topk(3).indices.tolist())
        kept = {i for i in range(20) if out[i] != 0}
        assert kept == {i for i in largest if row[i] > 0}  # the top 3, minus those ReLU zeroes
        assert all(out[i] == row[i] for i in kept)
    assert ((z != 0).sum(1) <= 3).all() and (z != 0).sum(1).max() == 3


def one_pass(recon=torch.tensor(0.0), progress=None) -> Pass:
    """A pass's context for a bottleneck's terms that use only the reconstruction loss and the progress."""
    return Pass(torch.zeros(1), torch.zeros(1), recon, None, None, progress)


def test_active_units_and_l0():
    z = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0]])
    assert ReLU().active(z).tolist() == [[False, True, False], [True, True, False]]
    _, stats = ReLU().terms(ReLU()(z), one_pass())
    assert stats["l0"].item() == 1.5
    figures = ReLU().split_figures({"n": torch.tensor(2.0), "active": ReLU().active(z).float().sum(0)})
    assert figures["activation_frequency"].tolist() == [0.5, 1.0, 0.0] and figures["dead_fraction"].item() == pytest.approx(1 / 3)
    assert Linear().active(z) is None and Linear().terms(Linear()(z), one_pass())[1] == {}


def test_gaussian_head_is_twice_as_wide_and_the_code_is_the_mean():
    b = Gaussian()
    h = torch.randn(5, 8)
    latent = b(h)
    assert b.head_dim(4) == 8 and isinstance(b, Stochastic)
    assert torch.equal(latent.code, h[:, :4]) and torch.equal(latent.logvar, h[:, 4:])
    assert latent.z.shape == (5, 4) and not torch.equal(latent.z, latent.code)


def test_closed_form_kl_equals_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    q = Normal(mean, (0.5 * logvar).exp())
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    se = mc.std(0) / math.sqrt(len(mc))
    assert (gaussian_kl(mean, logvar) - mc.mean(0)).abs().max() < 5 * se.max()
    assert gaussian_kl(mean, logvar).tolist() == pytest.approx(kl_divergence(q, Normal(0.0, 1.0)).sum(1).tolist(), rel=1e-5)


def test_gaussian_term_is_beta_times_kl_with_warmup():
    b = Gaussian(beta=0.5, warmup_epochs=2)
    h = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    latent = b(h)
    q = Normal(h[:, :3], (0.5 * h[:, 3:]).exp())
    kl = kl_divergence(q, Normal(0.0, 1.0)).sum(1).mean().item()
    recon = torch.tensor(10.0)
    for progress, beta in ((0.0, 0.0), (1.0, 0.25), (3.0, 0.5), (None, 0.5)):
        term, stats = b.terms(latent, one_pass(recon, progress))
        assert term.item() == pytest.approx(beta * kl, rel=1e-5)
        assert stats["nelbo"].item() == pytest.approx(10.0 + kl, rel=1e-5)  # the bound counts the whole KL
        assert ("beta" in stats) == (progress is not None)


def test_importance_weights_are_log_prior_minus_log_posterior():
    b = Gaussian()
    h = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    z, log_w = b.importance_samples(h, 5)
    q = Normal(h[:, :2], (0.5 * h[:, 2:]).exp())
    expected = Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    assert z.shape == (5, 3, 2)
    torch.testing.assert_close(log_w, expected)


def split_figures_of(bottleneck, code: torch.Tensor) -> dict:
    from autoenc.model.metrics import SplitStatistics

    stats = SplitStatistics()
    stats.update(code, bottleneck.tally(Latent(code, code, code)), torch.zeros(len(code), 1), torch.zeros(len(code), 1))
    return stats.figures(bottleneck)


@pytest.mark.parametrize("bottleneck", [ReLU(), TopK(k=1)], ids=lambda b: type(b).__name__)
def test_a_relu_or_topk_unit_is_dead_only_when_it_is_never_non_zero(bottleneck):
    code = torch.zeros(50, 4)
    code[7, 1], code[:, 2] = 1e-6, 0.5  # unit 1 fires once, barely; 2 always; 0 and 3 never
    figures = split_figures_of(bottleneck, code)
    assert figures["dead_fraction"].item() == 0.5 and figures["dead_threshold"].item() == 0.0


def test_a_sigmoid_unit_under_kl_is_dead_when_it_never_exceeds_the_target_rate():
    from autoenc.model.core import Autoencoder
    from autoenc.model.backbones import mlp
    from autoenc.model.penalties import KL

    model = Autoencoder(mlp, (1, 4, 4), 4, Sigmoid(), penalty=KL(rho=0.01))
    code = torch.full((100, 4), 0.009)
    code[:, 0] = 0.011  # every example a little above ρ: firing near its target rate
    code[::10, 1] = 0.5  # one example in ten: mean rate 0.058
    figures = split_figures_of(model.bottleneck, code)
    assert figures["dead_fraction"].item() == 0.5 and figures["dead_threshold"].item() == pytest.approx(0.01)
    assert figures["mean_rate"].item() == pytest.approx(code.mean().item())
    assert figures["target_rate"].item() == pytest.approx(0.01)
    # without a target rate the sigmoid fires above 0.1, or above the threshold given
    assert split_figures_of(Sigmoid(), code)["dead_fraction"].item() == 0.75
    assert split_figures_of(Sigmoid(threshold=0.01), code)["dead_fraction"].item() == 0.5


def test_a_linear_code_has_no_dead_units_and_a_gaussian_reports_active_units():
    assert "dead_fraction" not in split_figures_of(Linear(), torch.randn(20, 3))
    g = Gaussian()
    g.setup(3)
    from autoenc.model.metrics import SplitStatistics

    stats = SplitStatistics()
    mean = torch.stack([torch.linspace(-1, 1, 40), torch.zeros(40), 0.01 * torch.randn(40)], 1)
    stats.update(mean, {}, torch.zeros(40, 1), torch.zeros(40, 1))
    assert stats.figures(g)["active_units"].item() == 1.0


def test_topk_standardize_chooses_by_batch_statistics_and_codes_the_centered_value():
    """Training: the k chosen by h standardized with the batch's mean and variance (torch's batch_norm as
    the independent computation), each chosen unit's code its h less the batch mean, ReLU'd; the running
    estimates start at the first batch's and follow at the momentum; evaluation uses them, unchanged."""
    g = torch.Generator().manual_seed(0)
    spread, offsets = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([10.0, 0, -3, 1, 2])
    first, second = (torch.randn(16, 5, generator=g) * spread + offsets for _ in range(2))
    b = TopK(k=2, standardize=0.25)
    b.setup(5)
    b.train()

    def expected(h, mean=None, var=None):
        top = F.batch_norm(h, mean, var, training=mean is None, eps=1e-5).topk(2, dim=1).indices
        centered = h - (h.mean(0) if mean is None else mean)
        return torch.zeros_like(h).scatter(1, top, torch.relu(centered.gather(1, top)))

    torch.testing.assert_close(b(first).code, expected(first))
    torch.testing.assert_close(b.offset, first.mean(0))
    torch.testing.assert_close(b.variance, first.var(0, unbiased=False))
    torch.testing.assert_close(b(second).code, expected(second))
    torch.testing.assert_close(b.offset, 0.75 * first.mean(0) + 0.25 * second.mean(0))
    b.eval()
    mean, var = b.offset.clone(), b.variance.clone()
    torch.testing.assert_close(b(second).code, expected(second, mean, var))
    torch.testing.assert_close(b.offset, mean)


def test_topk_standardize_gives_each_unit_its_share_where_offsets_decide_plain_top_k():
    """Units whose offsets differ more than their spread over examples (the state of a freshly initialized
    mlp: README, dead units): plain top-k lets the same k units win every example; standardized, each of
    the n units fires on about k/n of them."""
    g = torch.Generator().manual_seed(0)
    h = 0.1 * torch.arange(32.0) + 0.02 * torch.randn(4096, 32, generator=g)
    plain, fair = TopK(k=4, standardize=0.0), TopK(k=4, standardize=0.1)
    plain.setup(32)
    fair.setup(32)
    fair.train()
    assert (plain(h).code > 0).any(0).sum().item() == 4
    rates = (fair(h).code > 0).float().mean(0)
    assert 0.1 < rates.min().item() and rates.max().item() < 0.15  # k/n = 0.125
