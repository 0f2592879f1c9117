"""Beyond the five: codes on a grid of positions (net.latent=grid) for linear, gaussian and vq, and
conditional models (model.condition) whose samples carry the label they were given; every command on a VQ
and on a conditional model works or is refused in one line."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from autoenc.model.backbones import conv, mlp, resnet
from autoenc.model.bottlenecks import Gaussian, Linear, ReLU, Sigmoid, TopK
from autoenc.model.conditions import Attributes, Condition, Label
from autoenc.model.core import Autoencoder
from autoenc.model.penalties import L1
from autoenc.model.quantize import VQ
from autoenc.util.errors import UserError
from conftest import FAST, cli_error, cli_here, train_run


def grid_side(px: int, stages: int) -> int:
    """The side of the code's grid after `stages` stride-2 convolutions with padding 1, worked out by the
    convolution arithmetic: out = floor((in + 2·1 − 3) / 2) + 1."""
    for _ in range(stages):
        px = (px + 2 - 3) // 2 + 1
    return px


@pytest.mark.parametrize("px, channels", [(28, (8, 16)), (32, (8, 16)), (64, (8, 16, 16))])
@pytest.mark.parametrize("bottleneck", [Linear, Gaussian, partial(VQ, codes=8)], ids=["linear", "gaussian", "vq"])
def test_a_grid_code_has_a_vector_at_each_position_and_decodes_to_the_input_size(px, channels, bottleneck):
    torch.manual_seed(0)
    ae = Autoencoder(partial(conv, channels=channels, latent="grid"), (1, px, px), 4, bottleneck())
    side = grid_side(px, len(channels))
    assert ae.grid == (side, side) and ae.code_shape == (4, side, side)
    assert (px, side) in ((28, 7), (32, 8), (64, 8))
    x = torch.rand(3, 1, px, px)
    latent = ae.encode(x)
    assert latent.code.shape == (3, 4, side, side) and ae.reconstruct(x).shape == x.shape
    out = ae(x)
    assert out.logits.shape == x.shape and torch.isfinite(out.loss)
    if isinstance(ae.bottleneck, Gaussian):
        assert ae.sample(5).shape == (5, 1, px, px)
        # KL summed over the whole map, against torch.distributions
        q = Normal(latent.mean, (0.5 * latent.logvar).exp())
        expected = kl_divergence(q, Normal(0.0, 1.0)).flatten(1).sum(1).mean()
        torch.testing.assert_close(out.terms["kl"], expected, rtol=1e-5, atol=1e-5)
    if isinstance(ae.bottleneck, VQ):
        assert latent.indices.shape == (3, side, side) and int(latent.indices.max()) < 8


def test_a_resnet_grid_at_64_px_and_its_importance_weights_sum_over_the_map():
    torch.manual_seed(0)
    ae = Autoencoder(partial(resnet, widths=(8, 8, 8), norm=None, latent="grid"), (3, 64, 64), 2, Gaussian())
    assert ae.code_shape == (2, 8, 8)
    h = ae.encoder(torch.rand(2, 3, 64, 64))
    z, log_w = ae.bottleneck.importance_samples(h, 3, torch.Generator().manual_seed(1))
    mean, logvar = h.chunk(2, dim=1)
    q = Normal(mean, (0.5 * logvar).exp())
    expected = (Normal(0.0, 1.0).log_prob(z) - q.log_prob(z)).flatten(2).sum(-1)
    assert z.shape == (3, 2, 2, 8, 8) and log_w.shape == (3, 2)
    torch.testing.assert_close(log_w, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bottleneck, penalty, named", [
    (ReLU(), None, "bottleneck=relu"), (Sigmoid(), None, "bottleneck=sigmoid"), (TopK(k=2), None, "bottleneck=topk"),
    (Linear(), L1(), "penalty=l1")])
def test_a_code_that_must_be_flat_on_a_grid_is_refused_in_one_line(bottleneck, penalty, named):
    with pytest.raises(UserError) as error:
        Autoencoder(partial(conv, channels=(8,), latent="grid"), (1, 8, 8), 4, bottleneck, penalty=penalty)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{named} needs one flat code per example")
    assert "net.latent=flat" in message


def test_net_latent_must_be_flat_or_grid():
    with pytest.raises(UserError, match="^net.latent=square is invalid; choose flat .* or grid"):
        conv((1, 8, 8), 4, latent="square")


@pytest.mark.parametrize("net, shape", [(mlp, (1, 8, 8)), (partial(conv, channels=(8,)), (1, 8, 8)),
                                        (partial(conv, channels=(8,), latent="grid"), (1, 8, 8)), (mlp, (5,))],
                         ids=["mlp", "conv", "conv-grid", "vectors"])
def test_a_conditional_decoder_depends_on_the_label_and_refuses_without_one(net, shape):
    torch.manual_seed(0)
    ae = Autoencoder(net, shape, 3, Gaussian(), condition=Label(4))
    z = torch.randn(2, *ae.code_shape)
    assert not torch.allclose(ae.decode(z, torch.tensor(1)), ae.decode(z, torch.tensor(2)))
    torch.testing.assert_close(ae.decode(z, torch.tensor([1, 2]))[1], ae.decode(z, torch.tensor(2))[1])
    x = torch.rand(2, *shape)
    assert not torch.allclose(ae.encode(x, y=torch.tensor(0)).code, ae.encode(x, y=torch.tensor(3)).code)
    with pytest.raises(UserError, match=r"^this model is conditional \(model.condition=label\): give each example's label"):
        ae.decode(z)
    with pytest.raises(UserError, match=r"^label=4 is not one of this model's classes 0…3"):
        ae.sample(2, y=torch.tensor(4))
    with pytest.raises(UserError, match="^these examples have no labels"):
        ae.reconstruct(x, torch.tensor([-1, -1]))


def test_the_condition_vectors_are_one_hot_labels_and_signed_attributes():
    assert Label(3).vector(torch.tensor([2, 0]), 2).tolist() == [[0, 0, 1], [1, 0, 0]]
    smile = Attributes(["Smiling", "Eyeglasses", "Bald"])
    assert smile.of(["Smiling", "Bald"]).tolist() == [1, 0, 1]
    assert smile.vector(smile.of(["Eyeglasses"]), 2).tolist() == [[-1, 1, -1]] * 2
    with pytest.raises(UserError, match=r"^attributes=\['Hat'\] are not this model's; choose from Smiling, Eyeglasses, Bald"):
        smile.of(["Hat"])
    with pytest.raises(UserError, match="^this model is not conditional"):
        Condition().of(3)
    with pytest.raises(UserError, match=r"^model.condition='style' is invalid"):
        Condition.named("style")
    with pytest.raises(UserError, match=r"^label='7' is invalid"):
        Label(10).of("7")
    with pytest.raises(UserError, match=r"^attributes=\[7\] are not this model's"):
        smile.of(7)


def test_the_wrong_key_for_a_conditional_models_kind_is_refused_in_one_line(runs, capsys):
    assert cli_error(capsys, "sample", f"ckpt={runs / 'cvae'}", "attributes=[Smiling]").startswith(
        "autoenc: error: this model is conditioned on class labels (model.condition=label): choose one with label=K")
    assert cli_error(capsys, "sample", f"ckpt={runs / 'cvae'}", "label=12").startswith(
        "autoenc: error: label=12 is not one of this model's classes 0…9")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A conditional VAE and a VQ model on a grid, trained on the digits through the CLI."""
    root = tmp_path_factory.mktemp("beyond")
    train_run(root / "cvae", "model=vae", "model.condition=label", "eval.iwae_samples=4", "trainer.max_epochs=12",
              "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", fast=False)
    train_run(root / "vq", "net=conv", "net.latent=grid", "bottleneck=vq", "bottleneck.codes=16", *FAST)
    return root


def test_a_conditional_vaes_samples_carry_their_label(runs, capsys):
    cli_here("evaluate", f"ckpt={runs / 'cvae'}")
    figures = json.loads((runs / "cvae" / "evaluation.json").read_text())
    assert figures["sample_label_accuracy"] >= 0.6  # ten labels: chance is 0.1
    assert figures["sample_label_accuracy"] == pytest.approx(np.mean([figures[f"sample_label_accuracy_{k}"] for k in range(10)]))
    assert (runs / "cvae" / "samples.png").exists()


@pytest.mark.parametrize("kind", ["cvae", "vq"])
@pytest.mark.parametrize("command", ["evaluate", "reconstruct", "encode", "interpolate", "score", "sample",
                                     "sample label=3", "attribute from=1 to=7", "denoise noise=gaussian"])
def test_every_command_on_a_vq_and_a_conditional_model_works_or_is_refused_in_one_line(runs, kind, command, capsys):
    name, *args = command.split()
    argv = [name, f"ckpt={runs / kind}", *args]
    refusals = {("vq", "sample"): "bottleneck=vq has no prior to sample from",
                ("vq", "sample label=3"): "this model is not conditional: sample draws from the whole prior"}
    if (kind, command) in refusals:
        assert cli_error(capsys, *argv).startswith("autoenc: error: " + refusals[kind, command])
    else:
        cli_here(*argv)


def test_encode_then_decode_gives_the_reconstruction_for_vq_indices_and_conditional_codes(runs, capsys):
    import autoenc

    for kind in ("vq", "cvae"):
        cli_here("encode", f"ckpt={runs / kind}")
        encoded = runs / kind / "commands" / "encode_test.npz"
        with np.load(encoded) as arrays:
            if kind == "vq":
                assert arrays["indices"].shape[1:] == (2, 2) and arrays["code"].shape[1] == 16 * 2 * 2
        cli_here("decode", f"ckpt={runs / kind}", f"codes={encoded}")
        with np.load(runs / kind / "commands" / "decode_encode_test.npz") as decoded:
            x_hat = decoded["x_hat"]
        model = autoenc.load(runs / kind, device="cpu")
        x, y = model.split("test")
        np.testing.assert_allclose(x_hat, model.reconstruct(x, labels=y, numpy=True), atol=1e-5)


def cifar_fixture(root, n_train: int = 20, n_test: int = 10):
    """CIFAR-10's python batches in their real layout and format (pickled dicts of a uint8 data array and a
    labels list), with random images."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{i}", n_train) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {b"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": g.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_the_vqvae_cifar10_recipe_trains_the_papers_shape_on_cifar_files(tmp_path):
    cifar_fixture(tmp_path / "data")
    results = train_run(tmp_path / "run", "experiment=vqvae_cifar10", f"data.root={tmp_path / 'data'}",
                        "net.hidden=8", "net.residual_hidden=8", "bottleneck.codes=16", "trainer.max_epochs=1",
                        "data.batch_size=16", *FAST)
    assert 0 < results["test/codes_used"] <= 1 and results["test/mse"] > 0
    import autoenc

    model = autoenc.load(tmp_path / "run", device="cpu")
    assert model.autoencoder.code_shape == (64, 8, 8) and model.shape == (3, 32, 32)
    assert len(model.split("train")[0]) == 90 and len(model.split("test")[0]) == 10  # 100 less a tenth for validation


def test_a_cifar_batch_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    import os
    import pickle

    folder = cifar_fixture(tmp_path)

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    message = cli_error(capsys, "train", "data=cifar10", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert message.startswith(f"autoenc: error: {folder / 'test_batch'} is not a CIFAR-10 batch (it names ")
    assert "os" in message and "system" in message and not (tmp_path / "ran").exists()
