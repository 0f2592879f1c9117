"""Backbones: the head is as wide as the bottleneck asks, and the decoder mirrors the data's shape."""

import pytest
import torch

from autoenc.nets import conv, mlp


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 17, 23)])
@pytest.mark.parametrize("build", [mlp, conv])
@pytest.mark.parametrize("head_dim", [5, 10])
def test_decoder_output_matches_input_shape(build, shape, head_dim):
    enc, dec = build(shape=shape, latent_dim=5, head_dim=head_dim)
    h = enc(torch.rand(4, *shape))
    assert h.shape == (4, head_dim)
    assert dec(h[:, :5]).shape == (4, *shape)
