"""The vector-quantized bottleneck against independent computations: nearest codes by brute force, the
straight-through gradient, commitment and EMA updates by hand, k-means, dead-code revival, checkpoints."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from autoenc.model.bottlenecks import Pass
from autoenc.model.bottlenecks import Stochastic
from autoenc.model.quantize import VQ
from autoenc.util.errors import UserError

STEP = Pass(torch.zeros(1), torch.zeros(1), torch.tensor(0.0), None, None, None)


def vq(latent_dim: int, **kwargs) -> VQ:
    b = VQ(**kwargs)
    b.setup(latent_dim)
    return b


def brute_force_nearest(rows: torch.Tensor, codebook: torch.Tensor) -> list[int]:
    """Each row's nearest code by a Python loop over the codes."""
    out = []
    for r in rows:
        dists = [float(((r - c) ** 2).sum()) for c in codebook]
        out.append(min(range(len(dists)), key=dists.__getitem__))
    return out


@pytest.mark.parametrize("shape", [(40, 6), (3, 6, 4, 5)], ids=["flat", "spatial"])
def test_each_vector_goes_to_its_nearest_code(shape):
    g = torch.Generator().manual_seed(0)
    b = vq(6, codes=16, kmeans_batches=0).eval()
    b.codebook.copy_(torch.randn(16, 6, generator=g))
    h = torch.randn(*shape, generator=g)
    latent = b(h)
    if len(shape) == 2:
        assert latent.indices.tolist() == brute_force_nearest(h, b.codebook)
        expected = b.codebook[latent.indices]
    else:
        B, D, H, W = shape
        assert latent.indices.shape == (B, H, W)
        for i in range(B):
            for y in range(H):
                for x in range(W):
                    assert latent.indices[i, y, x] == brute_force_nearest(h[i, :, y, x][None], b.codebook)[0]
        expected = torch.stack([b.codebook[latent.indices[i]].permute(2, 0, 1) for i in range(B)])
    torch.testing.assert_close(latent.z, expected)
    assert latent.code is latent.z and latent.h is h
    assert len(set(latent.indices.flatten().tolist())) > 4  # a real choice among codes, not one code


@pytest.mark.parametrize("ema", [True, False])
def test_straight_through_gradient_is_the_identity(ema):
    g = torch.Generator().manual_seed(1)
    b = vq(5, codes=8, ema=ema, kmeans_batches=0)
    h = torch.randn(7, 5, 2, 3, generator=g, requires_grad=True)
    w = torch.randn(7, 5, 2, 3, generator=g)
    (b(h).z * w).sum().backward()
    torch.testing.assert_close(h.grad, w)
    if not ema:  # the decoder's gradient does not reach the codebook; only the codebook loss does
        assert b.codebook.grad is None


CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
H2 = torch.tensor([[0.2, -0.1], [0.9, 1.3]])  # nearest: code 0 (distance² 0.05), code 1 (0.10)


@pytest.mark.parametrize("ema", [True, False])
def test_commitment_and_codebook_loss_by_hand(ema):
    b = vq(2, codes=2, beta=0.25, ema=ema, kmeans_batches=0).eval()
    b.codebook.data.copy_(CODEBOOK)
    h = H2.clone().requires_grad_(True)
    term, figures = b.terms(b(h), STEP)
    assert figures["commitment"].item() == pytest.approx((0.05 + 0.10) / 2)
    assert term.item() == pytest.approx(0.25 * 0.075 + (0 if ema else 0.075))
    term.backward()
    # ∂/∂h of β·mean_b ‖h_b − e_b‖²: β (h_b − e_b)
    torch.testing.assert_close(h.grad, 0.25 * (H2 - CODEBOOK))
    if not ema:  # ∂/∂e_k of mean_b ‖h_b − e_b‖² = e_k − h_b for the one example b that chose k
        torch.testing.assert_close(b.codebook.grad, torch.tensor([[-0.2, 0.1], [0.1, -0.3]]))


def test_commitment_is_a_mean_over_positions():
    """One example whose grid holds H2's two vectors: the same per-position mean, not their sum."""
    b = vq(2, codes=2, beta=1.0, kmeans_batches=0).eval()
    b.codebook.copy_(CODEBOOK)
    h = H2.t().reshape(1, 2, 1, 2)
    _, figures = b.terms(b(h), STEP)
    assert figures["commitment"].item() == pytest.approx(0.075)


@pytest.mark.parametrize("spatial", [False, True])
def test_ema_update_by_hand(spatial):
    b = vq(2, codes=2, decay=0.5, eps=0.1, kmeans_batches=0, revive=False).train()
    b.codebook.copy_(torch.tensor([[0.0, 0.0], [4.0, 4.0]]))
    b.embed_sum.copy_(b.codebook)  # counts start at 1: sums = codes
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 4.0]])  # codes 0, 0, 1
    h = rows.t().reshape(1, 2, 1, 3) if spatial else rows
    latent = b(h)
    assert latent.indices.flatten().tolist() == [0, 0, 1]
    _, figures = b.terms(latent, STEP)
    # N = ½·1 + ½·(2, 1) = (1.5, 1); m_0 = ½·0 + ½·(1, 1); m_1 = ½·(4, 4) + ½·(5, 4)
    torch.testing.assert_close(b.cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(b.embed_sum, torch.tensor([[0.5, 0.5], [4.5, 4.0]]))
    # smoothed N_i = (N_i + 0.1) / (2.5 + 0.2) · 2.5
    n0, n1 = 1.6 / 2.7 * 2.5, 1.1 / 2.7 * 2.5
    torch.testing.assert_close(b.codebook, torch.tensor([[0.5 / n0, 0.5 / n0], [4.5 / n1, 4.0 / n1]]))
    p = [2 / 3, 1 / 3]
    assert figures["batch_perplexity"].item() == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)))
    assert figures["batch_codes_used"].item() == 1.0 and figures["dead_codes"].item() == 0.0


def test_no_update_outside_training():
    b = vq(2, codes=2, kmeans_batches=3).eval()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    b.terms(b(torch.randn(5, 2)), STEP)
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_kmeans_puts_codes_at_the_centres_of_separated_clusters():
    g = torch.Generator().manual_seed(2)
    centres = torch.tensor([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]])
    rows = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 2, generator=g))
    means = rows.view(4, 50, 2).mean(1)
    for seed in range(5):
        b = vq(2, codes=4, kmeans_iters=10).train()
        b(rows[torch.randperm(200, generator=g)], torch.Generator().manual_seed(seed))
        assert bool(b.initialised)
        # each cluster's mean has one code at it (the codebook in some order)
        dist = torch.cdist(means, b.codebook)
        assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3] and dist.min(1).values.max() < 1e-4
        torch.testing.assert_close(b.cluster_size, torch.full((4,), 50.0))


def test_kmeans_with_fewer_vectors_than_codes():
    rows = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 5.0]])
    b = vq(2, codes=8).train()
    latent = b(rows, torch.Generator().manual_seed(0))
    near = torch.cdist(b.codebook, rows).min(1).values
    assert near.max() < 0.2  # every code a copy of a vector, nudged
    assert torch.equal(latent.z, rows) and len(set(latent.indices.tolist())) == 3  # each vector has its own code


def test_kmeans_over_several_batches():
    g = torch.Generator().manual_seed(3)
    b = vq(3, codes=4, kmeans_batches=2).train()
    b(torch.randn(16, 3, generator=g))
    assert not bool(b.initialised)
    b(torch.randn(16, 3, generator=g))
    assert bool(b.initialised) and b._pool == []
    frozen = b.codebook.clone()
    b(torch.randn(16, 3, generator=g) + 100)  # initialised: no k-means on later batches
    assert torch.equal(b.codebook, frozen)


@pytest.mark.parametrize("ema", [True, False])
@pytest.mark.parametrize("revive", [True, False])
def test_a_dead_code_is_revived_after_dead_after_steps(ema, revive):
    g = torch.Generator().manual_seed(4)
    b = vq(2, codes=4, ema=ema, kmeans_batches=0, dead_after=3, revive=revive).train()
    b.codebook.data.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1e3, 1e3]]))
    if ema:
        b.embed_sum.copy_(b.codebook)
    for step in range(1, 6):
        h = torch.randn(64, 2, generator=g)
        _, figures = b.terms(b(h, g), STEP)
        if step < 3 or not revive:
            assert b.codebook[3].norm() > 500 and b.since_used[3] == step
            assert figures["dead_codes"].item() == (0.25 if step >= 3 else 0.0)
        elif step == 3:
            assert figures["dead_codes"].item() == 0.25  # dead this step, then revived
            assert (b.codebook[3] == h).all(1).any()  # onto one of this batch's vectors
            assert b.since_used[3] == 0
            if ema:
                assert b.cluster_size[3] == 1 and torch.equal(b.embed_sum[3], b.codebook[3])
        else:
            assert b.codebook[3].norm() < 10  # a live code among the data now
    assert b.since_used[:3].max() == 0  # the live codes were used at every step


def test_checkpoint_round_trip():
    g = torch.Generator().manual_seed(5)
    for ema in (True, False):
        kwargs = dict(codes=8, ema=ema, dead_after=2)
        a = vq(3, **kwargs).train()
        for _ in range(4):
            a.terms(a(torch.randn(32, 3, 2, 2, generator=g), g), STEP)
        b = vq(3, **kwargs)
        b.load_state_dict(a.state_dict())
        assert bool(b.initialised) and torch.equal(b.since_used, a.since_used)
        h = torch.randn(16, 3, 2, 2, generator=g)
        a.eval(), b.eval()
        assert torch.equal(a(h).z, b(h).z)
        a.train(), b.train()  # a further training step: the same update on both
        ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        a.terms(a(h, ga), STEP), b.terms(b(h, gb), STEP)
        assert torch.equal(a.codebook, b.codebook) and torch.equal(a.since_used, b.since_used)


@pytest.mark.parametrize("shape", [(9, 4), (2, 4, 3, 5)], ids=["flat", "spatial"])
def test_lookup_of_the_indices_is_the_quantized_code(shape):
    b = vq(4, codes=6).train()
    latent = b(torch.randn(*shape, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(b.lookup(latent.indices), latent.z)
    assert b.lookup(latent.indices).shape == shape


@pytest.mark.parametrize("key, value", [("codes", 0), ("beta", -1.0), ("ema", 1), ("decay", 1.0), ("eps", 0.0),
                                        ("kmeans_batches", -1), ("kmeans_iters", 2.5), ("dead_after", 0),
                                        ("revive", "yes")])
def test_settings_are_checked(key, value):
    with pytest.raises(UserError, match=rf"^bottleneck\.{key}={value!r} is invalid"):
        VQ(**{key: value})


def test_refusals_and_sizes():
    from autoenc.model.backbones import mlp
    from autoenc.model.core import Autoencoder

    b = vq(5, codes=4)
    assert b.active_size(5) == 5 and b.head_dim(5) == 5 and not isinstance(b, Stochastic)
    model = Autoencoder(partial(mlp, hidden=(8,)), (1, 4, 4), 5, VQ(codes=4))
    with pytest.raises(UserError, match="^bottleneck=vq has no prior to sample from; .*model=vae"):
        model.sample(3)
    with pytest.raises(UserError, match="^bottleneck=vq has no posterior and prior"):
        model.log_likelihood(torch.zeros(2, 1, 4, 4), 3)


def test_an_autoencoder_with_vq_trains():
    from autoenc.model.backbones import mlp
    from autoenc.model.core import Autoencoder

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    model = Autoencoder(partial(mlp, hidden=(32,)), (1, 4, 4), 3, VQ(codes=16, dead_after=5))
    # data from 6 prototypes: a codebook of 16 can represent it
    x = torch.rand(6, 1, 4, 4, generator=g).round()[torch.randint(6, (96,), generator=g)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for i in range(60):
        out = model(x, progress=i / 60, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert {"commitment", "batch_perplexity", "batch_codes_used", "dead_codes"} <= set(out.terms)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5



def _ddp_run(batches, rank=None, **kwargs) -> dict:
    """A VQ's state after a training step on each batch (rank r's shard under DDP, else the whole batch)."""
    torch.manual_seed(0)  # the same starting codebook everywhere
    b = vq(3, codes=8, **kwargs).train()
    for h in batches:
        h = h.flatten(0, 1) if rank is None else h[rank]
        b.terms(b(h, torch.Generator().manual_seed(rank or 0)), STEP)
    return b.state_dict()


def _ddp_batches(shift: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(10)
    return [torch.randn(2, 16, 3, generator=g) + shift * torch.tensor([0.0, 1.0])[:, None, None] for _ in range(4)]


def _ddp_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save({"ema": _ddp_run(_ddp_batches(0.0), rank, kmeans_batches=0, revive=False),
                    "init": _ddp_run(_ddp_batches(5.0), rank, dead_after=2)}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree(tmp_path):
    """Two ranks with different shards (rank 1's shifted) and their own draws end with the same k-means
    codebook, EMA state and revivals; and the EMA on shards is the one-process EMA on the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "state")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"state.{r}") for r in (0, 1))
    for case in ("ema", "init"):
        assert all(torch.equal(r0[case][k], r1[case][k]) for k in r0[case]), case
    alone = _ddp_run(_ddp_batches(0.0), kmeans_batches=0, revive=False)
    for k in ("codebook", "cluster_size", "embed_sum", "since_used"):
        torch.testing.assert_close(r0["ema"][k], alone[k])
