"""model.weight_penalty (λ/2 · Σ‖W‖² over weight matrices, not biases or norms) and full-batch L-BFGS."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from autoenc.training.runs import build
from conftest import compose

SMALL = ["model.latent_dim=4", "net.hidden=[16]", "net.norm=LayerNorm", "model.scheduler=null"]


def test_weight_penalty_equals_half_lambda_times_the_squared_weight_matrices_and_excludes_biases_and_norms():
    _, model, _ = build(compose(*SMALL, "model.weight_penalty=0.3"))
    ae = model.autoencoder
    x = torch.rand(5, 1, 8, 8)
    out = ae(x)
    by_name = {n: p for n, p in ae.named_parameters()}
    expected = sum(p.detach().double().pow(2).sum() for n, p in by_name.items()
                   if n.endswith("weight") and p.dim() == 2)  # Linear weights; LayerNorm weights are 1-d
    assert len([n for n, p in by_name.items() if n.endswith("weight") and p.dim() == 1]) == 2  # the norms exist
    assert out.terms["weight_penalty"].item() == pytest.approx(0.15 * expected.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.terms["recon"] + out.terms["weight_penalty"]).item(), rel=1e-6)
    out.loss.backward()
    bias = ae.encoder[1].bias
    without = build(compose(*SMALL))[1].autoencoder
    without.load_state_dict(ae.state_dict())
    without(x).loss.backward()
    torch.testing.assert_close(bias.grad, without.encoder[1].bias.grad)  # biases: no decay gradient
    w = ae.encoder[1].weight
    torch.testing.assert_close(w.grad - without.encoder[1].weight.grad, 0.3 * w.detach(), rtol=1e-4, atol=1e-6)


def test_a_negative_weight_penalty_is_refused_in_one_line():
    from autoenc.util.errors import UserError

    with pytest.raises(UserError, match=r"^model.weight_penalty=-1 is invalid"):
        build(compose("model.weight_penalty=-1"))


def test_full_batch_lbfgs_equals_a_plain_pytorch_lbfgs_loop():
    lbfgs = ["model.optimizer._target_=torch.optim.LBFGS", "model.optimizer.lr=1", "+model.optimizer.max_iter=5",
             "+model.optimizer.history_size=10", "data.batch_size=100000", "model.weight_penalty=0.01"]
    cfg = compose(*SMALL, *lbfgs, fast=False)
    torch.manual_seed(0)
    datamodule, model, _ = build(cfg)
    plain = build(cfg)[1].autoencoder
    plain.load_state_dict(model.autoencoder.state_dict())
    x = datamodule.transform(datamodule.splits["train"][0])
    assert len(x) <= 100000  # one batch: the whole training split
    with torch.no_grad():
        start = plain(x).loss.item()

    opt = torch.optim.LBFGS(plain.parameters(), lr=1, max_iter=5, history_size=10)

    def closure():
        opt.zero_grad()
        loss = plain(x).loss
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0).fit(model, datamodule=datamodule)
    with torch.no_grad():
        ours, theirs = model.autoencoder(x).loss.item(), plain(x).loss.item()
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert ours < start - 1  # it trained
