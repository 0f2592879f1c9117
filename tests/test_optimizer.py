"""The optimizer step: Adam and AdamW run their fused kernel by default, with the results of the unfused
optimizer; a config that chooses the kernel keeps its choice."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, train_here
from autoenc.training.runs import build


@pytest.mark.parametrize("overrides", [[], ["model.optimizer._target_=torch.optim.AdamW", "+model.optimizer.weight_decay=0.1"],
                                       ["trainer.gradient_clip_val=0.01", "trainer.accumulate_grad_batches=2"]],
                         ids=["adam", "adamw", "clipped-accumulated"])
def test_fused_by_default_and_equal_to_the_unfused_optimizer(tmp_path, overrides):
    fused = train_here(tmp_path / "fused", *overrides, "trainer.max_epochs=2")
    plain = train_here(tmp_path / "plain", *overrides, "+model.optimizer.fused=false", "trainer.max_epochs=2")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            for d in ("fused", "plain"))
    assert a["optimizer_states"][0]["param_groups"][0]["fused"] is True
    assert not b["optimizer_states"][0]["param_groups"][0]["fused"]
    assert a["global_step"] == b["global_step"] > 0
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, rtol=1e-4, atol=1e-5)
    assert fused["test/loss"] == pytest.approx(plain["test/loss"], rel=1e-4)


def test_a_chosen_kernel_and_other_optimizers_are_left_as_configured():
    _, module, _ = build(compose("+model.optimizer.foreach=true"))
    assert module.optimizer().defaults["foreach"] is True and not module.optimizer().defaults["fused"]
    _, module, _ = build(compose("model.optimizer._target_=torch.optim.SGD"))
    sgd = module.optimizer()
    assert isinstance(sgd, torch.optim.SGD) and not sgd.defaults.get("fused")
