"""Backbones: the decoder mirrors the data's shape for every data set and head width."""

import pytest
import torch

from autoenc.nets import conv, mlp


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 17, 23)])
@pytest.mark.parametrize("build", [mlp, conv])
@pytest.mark.parametrize("head_mult", [1, 2])
def test_decoder_output_matches_input_shape(build, shape, head_mult):
    enc, dec = build(shape=shape, latent_dim=5, head_mult=head_mult)
    h = enc(torch.rand(4, *shape))
    assert h.shape == (4, 5 * head_mult)
    assert dec(h[:, :5]).shape == (4, *shape)
