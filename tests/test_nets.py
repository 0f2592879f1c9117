"""Backbones: the head is as wide as the bottleneck asks, and the decoder mirrors the data's shape."""

import pytest
import torch
from torch import nn

from autoenc.util.errors import UserError
from autoenc.model.backbones import conv, mlp, resnet
from conftest import compose


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 17, 23)])
@pytest.mark.parametrize("build", [mlp, conv])
@pytest.mark.parametrize("head_dim", [5, 10])
def test_decoder_output_matches_input_shape(build, shape, head_dim):
    enc, dec = build(shape=shape, latent_dim=5, head_dim=head_dim)
    h = enc(torch.rand(4, *shape))
    assert h.shape == (4, head_dim)
    assert dec(h[:, :5]).shape == (4, *shape)


PHOTO_NETS = {
    "resnet": lambda s: resnet(s, 6, 12, widths=(8, 16, 16, 32), blocks=(1, 2, 1, 1)),
    "resnet GroupNorm": lambda s: resnet(s, 6, 12, widths=(8, 16), norm="GroupNorm", groups=4),
    "resnet no norm": lambda s: resnet(s, 6, 12, widths=(8, 16, 32), norm=None),
    "conv 5 stages BatchNorm": lambda s: conv(s, 6, 12, channels=(4, 8, 8, 16, 16), norm="BatchNorm2d"),
}


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 64, 64), (3, 128, 128), (1, 48, 80), (3, 37, 21)])
@pytest.mark.parametrize("name", list(PHOTO_NETS))
def test_photo_backbones_give_the_head_and_logits_of_the_input_shape(name, shape):
    torch.manual_seed(0)
    enc, dec = PHOTO_NETS[name](shape)
    x = torch.rand(2, *shape)
    h = enc(x)
    assert h.shape == (2, 12)
    out = dec(h[:, :6])
    assert out.shape == x.shape and type(dec[-1]) in (nn.Conv2d, nn.ConvTranspose2d)  # logits: no squashing


def test_pytorch_vae_vanilla_shape_is_one_line():
    from hydra.utils import instantiate

    cfg = compose("net=conv", "net.channels=[32,64,128,256,512]", "net.norm=BatchNorm2d", "net.activation=LeakyReLU")
    enc, dec = instantiate(cfg.net)(shape=(3, 64, 64), latent_dim=128, head_dim=256)
    convs = [m for m in enc if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (3, 32, (3, 3), (2, 2)), (32, 64, (3, 3), (2, 2)), (64, 128, (3, 3), (2, 2)), (128, 256, (3, 3), (2, 2)),
        (256, 512, (3, 3), (2, 2))]
    assert [m.num_features for m in enc if isinstance(m, nn.BatchNorm2d)] == [32, 64, 128, 256, 512]
    assert sum(isinstance(m, nn.LeakyReLU) for m in enc) == 5
    assert enc[-1].in_features == 512 * 2 * 2 and enc[-1].out_features == 256  # mean and log-variance
    assert [m.num_features for m in dec if isinstance(m, nn.BatchNorm2d)] == [256, 128, 64, 32]
    assert dec(torch.zeros(2, 128)).shape == (2, 3, 64, 64)


def test_todays_conv_keeps_its_layers_so_saved_runs_still_load():
    enc, dec = conv((1, 28, 28), 4)
    assert list(dict(enc.named_parameters())) == ["0.weight", "0.bias", "2.weight", "2.bias", "5.weight", "5.bias"]
    assert list(dict(dec.named_parameters())) == ["0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"]


@pytest.mark.parametrize("build", [lambda **k: conv((3, 20, 18), 4, norm="GroupNorm", groups=4, **k),
                                   lambda **k: resnet((3, 20, 18), 4, widths=(8, 16), **k)])
def test_channels_last_computes_the_same_function(build):
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    nhwc = build(channels_last=True)
    for a, b in zip(plain, nhwc):
        b.load_state_dict(a.state_dict())
        a.eval(), b.eval()
    x = torch.rand(3, 3, 20, 18)
    torch.testing.assert_close(nhwc[0](x), plain[0](x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nhwc[1](x[:, 0, 0, :4]), plain[1](x[:, 0, 0, :4]), rtol=1e-4, atol=1e-5)


def test_group_norm_takes_a_group_count_that_divides_each_width():
    enc, _ = resnet((3, 16, 16), 4, widths=(24, 40), norm="GroupNorm", groups=32)
    assert sorted({(m.num_groups, m.num_channels) for m in enc.modules() if isinstance(m, nn.GroupNorm)}) == [(8, 24), (8, 40)]


def test_bad_backbone_settings_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"^net.blocks=\[1, 2\] must be a positive integer, or one per stage"):
        resnet((3, 16, 16), 4, widths=(8, 16, 32), blocks=(1, 2))
    with pytest.raises(UserError, match=r"^net=resnet needs images \(C, H, W\)"):
        resnet((12,), 4)


def test_ddp_on_gpus_turns_batchnorm_into_syncbatchnorm():
    """Lightning's sync_batchnorm (on in trainer=ddp) swaps every BatchNorm for SyncBatchNorm: the statistics of
    the global batch, so a DDP run normalizes as one process does. (trainer=ddp_cpu cannot: SyncBatchNorm
    needs GPUs; there, GroupNorm is batch-independent.)"""
    from lightning.pytorch.plugins.layer_sync import TorchSyncBatchNorm

    assert compose("trainer=ddp").trainer.sync_batchnorm is True and "sync_batchnorm" not in compose("trainer=ddp_cpu").trainer
    enc, _ = resnet((3, 16, 16), 4, widths=(8, 16))
    synced = TorchSyncBatchNorm().apply(enc)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 1 + 2 * 3  # the stem's, and two in each block and its skip
    assert not any(type(m) is nn.BatchNorm2d for m in synced.modules())
