"""The optimizer step: Adam and AdamW run their fused kernel by default, with the results of the unfused
optimizer; a config that chooses the kernel keeps its choice."""

from __future__ import annotations

import pytest
import torch

from conftest import compose, train_here
from autoenc.training.runs import build


@pytest.mark.parametrize("overrides", [[], ["model.optimizer._target_=torch.optim.AdamW", "+model.optimizer.weight_decay=0.1"],
                                       ["trainer.gradient_clip_val=0.01", "trainer.accumulate_grad_batches=2"],
                                       ["model=vae", "trainer.precision=bf16-mixed"], ["model=vae", "trainer.precision=64-true"]],
                         ids=["adam", "adamw", "clipped-accumulated", "vae-bf16-mixed", "vae-64-true"])
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


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here")


@pytest.mark.parametrize("setting", ["loss", "nets"])
def test_a_compile_that_fails_warns_once_and_trains_eager(monkeypatch, caplog, setting):
    """Where torch.compile cannot compile (here its backend raises), model.compile falls back to eager with one
    warning, and the model trains as the eager one does, with the same parameter names."""
    import functools
    import logging

    real = torch.compile
    monkeypatch.setattr(torch, "compile", functools.partial(real, backend=_failing_backend))
    torch._dynamo.reset()
    _, eager, _ = build(compose("model=vae"))
    _, fallen, _ = build(compose("model=vae", f"model.compile={setting}"))
    assert list(fallen.state_dict()) == list(eager.state_dict())
    fallen.load_state_dict(eager.state_dict())
    x = torch.rand(8, *eager.autoencoder.shape)
    with caplog.at_level(logging.WARNING, logger="autoenc"):
        for _ in range(2):
            losses = [m.autoencoder(x, generator=torch.Generator().manual_seed(0)).loss for m in (eager, fallen)]
            torch.testing.assert_close(losses[1], losses[0])
            losses[1].backward()
    warned = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"model.compile={setting}: torch.compile failed (")
    assert warned[0].endswith("(RuntimeError: no C++ compiler here); training goes on eager")
    torch._dynamo.reset()


def test_a_compiled_loss_matches_eager(monkeypatch):
    """model.compile=loss runs the whole loss computation through torch.compile (here its graph capture
    without code generation, the aot_eager backend) with eager's numbers and gradients."""
    import functools

    real = torch.compile
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(real, backend=counting))
    torch._dynamo.reset()
    _, eager, _ = build(compose("model=ae"))
    _, fast, _ = build(compose("model=ae", "model.compile=loss"))
    fast.load_state_dict(eager.state_dict())
    x = torch.rand(8, *eager.autoencoder.shape)
    a, b = eager.autoencoder(x).loss, fast.autoencoder(x).loss
    assert graphs, "the loss computation was not captured"
    torch.testing.assert_close(b, a)
    a.backward(), b.backward()
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    torch._dynamo.reset()


def test_an_unknown_compile_setting_is_refused_in_one_line():
    from autoenc.util.errors import UserError

    with pytest.raises(UserError, match=r"model.compile='fast' is invalid: it must be null \(eager\), nets .* or loss"):
        build(compose("model.compile=fast"))


@pytest.mark.parametrize("overrides, pictures", [
    (["model=vae"], ["samples.png"]), (["model=vae", "model.condition=label"], ["samples.png"]),
    (["model=vae", "model.latent_dim=2"], ["manifold.png", "latent_scatter.png"]), (["model=sparse"], ["features.png"])],
    ids=["vae", "conditional", "2d", "sparse"])
def test_a_true_precision_trains_tests_and_draws(tmp_path, overrides, pictures):
    """bf16-true keeps the weights (and so the fused optimizer's state) in bfloat16: batches made float after
    Lightning's conversion, prior samples, the pictures' codes and the IWAE bound follow the precision's dtype."""
    from conftest import autoenc as cli

    figures = train_here(tmp_path / "run", *overrides, "trainer.precision=bf16-true", "trainer.max_epochs=1")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for k, v in ckpt["state_dict"].items() if v.is_floating_point()} == {torch.bfloat16}
    assert ckpt["optimizer_states"][0]["param_groups"][0]["fused"] is True
    assert torch.isfinite(torch.tensor(figures["test/loss"]))
    assert all((tmp_path / "run" / name).is_file() for name in pictures), sorted(p.name for p in (tmp_path / "run").iterdir())
    if overrides == ["model=vae"]:
        assert torch.isfinite(torch.tensor(figures["test/nll_iwae"]))
        cli("sample", f"ckpt={tmp_path / 'run'}", "n=4", f"out={tmp_path / 's.png'}")
        assert (tmp_path / "s.png").is_file()


def test_a_compiled_module_copies_and_pickles_as_an_eager_one():
    """model.compile goes through nn.Module.compile: a deep copy runs its own weights, and the module pickles."""
    import copy
    import pickle

    _, module, _ = build(compose("model.compile=nets"))
    twin = copy.deepcopy(module)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    x = torch.rand(2, *module.autoencoder.shape)
    assert not torch.equal(twin.autoencoder.encoder(x), module.autoencoder.encoder(x))
    assert torch.equal(pickle.loads(pickle.dumps(module)).autoencoder.encoder(x), module.autoencoder.encoder(x))


def test_float16_weights_that_overflow_name_the_precision(tmp_path):
    """16-true has no loss scaling: where the loss stops being finite, the line names the precision, not the
    learning rate."""
    from autoenc.util.errors import UserError

    with pytest.raises(UserError) as refused:
        train_here(tmp_path / "run", "trainer.precision=16-true", "trainer.max_epochs=1")
    assert str(refused.value).startswith("the training loss became nan at step ")
    assert "; trainer.precision=16-true trains in float16 without loss scaling; use bf16-mixed or bf16-true; " \
           "no checkpoint was saved yet" in str(refused.value)
