"""Encoder/decoder backbones built from the data's (C, H, W); decoders return logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def _act(name: str) -> nn.Module:
    return getattr(nn, name)()


def mlp(shape: Sequence[int], latent_dim: int, head_dim: int | None = None,
        hidden: Sequence[int] = (256, 128), activation: str = "ReLU", norm: str | None = None) -> tuple[nn.Module, nn.Module]:
    """Fully connected encoder (input → hidden → head_dim, default latent_dim) and its mirror decoder;
    `norm` (a torch.nn class such as BatchNorm1d or LayerNorm) after each hidden layer's Linear."""
    d = math.prod(shape)

    def layer(a: int, b: int) -> list[nn.Module]:
        return [nn.Linear(a, b), *([getattr(nn, norm)(b)] if norm else []), _act(activation)]

    widths = [d, *hidden]
    enc = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        enc += layer(a, b)
    enc.append(nn.Linear(widths[-1], head_dim or latent_dim))
    dec_widths = [latent_dim, *reversed(hidden)]
    dec = []
    for a, b in zip(dec_widths, dec_widths[1:]):
        dec += layer(a, b)
    dec += [nn.Linear(dec_widths[-1], d), nn.Unflatten(1, tuple(shape))]
    return nn.Sequential(*enc), nn.Sequential(*dec)


def conv(shape: Sequence[int], latent_dim: int, head_dim: int | None = None,
         channels: Sequence[int] = (32, 64), activation: str = "ReLU") -> tuple[nn.Module, nn.Module]:
    """Stride-2 3×3 convolutions (each halves H, W, rounding up) to a head of head_dim (default
    latent_dim) units, and transposed mirrors."""
    if len(shape) != 3:
        from autoenc.errors import UserError

        raise UserError(f"net=conv needs images (C, H, W); this data's examples have shape {tuple(shape)}: use net=mlp")
    c, h, w = shape
    sizes = [(h, w)]
    for _ in channels:
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    flat = channels[-1] * sizes[-1][0] * sizes[-1][1]
    enc, prev = [], c
    for ch in channels:
        enc += [nn.Conv2d(prev, ch, 3, stride=2, padding=1), _act(activation)]
        prev = ch
    enc += [nn.Flatten(), nn.Linear(flat, head_dim or latent_dim)]
    dec = [nn.Linear(latent_dim, flat), _act(activation), nn.Unflatten(1, (channels[-1], *sizes[-1]))]
    outs = [*reversed(channels[:-1]), c]
    for i, ch in enumerate(outs):
        (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
        # A 3×3 stride-2 transposed conv with padding 1 gives 2n − 1 + output_padding.
        dec.append(nn.ConvTranspose2d(prev, ch, 3, stride=2, padding=1,
                                      output_padding=(th - 2 * sh + 1, tw - 2 * sw + 1)))
        if i < len(outs) - 1:
            dec.append(_act(activation))
        prev = ch
    return nn.Sequential(*enc), nn.Sequential(*dec)


class UnitColumns(nn.Module):
    """W = V / ‖V‖ column by column (a weight normalization): every decoder column has unit norm at all
    times, and the gradient reaching V has no component along its column (Gao et al. 2024, sec. 2.3)."""

    def forward(self, v):
        return v / v.norm(dim=0, keepdim=True).clamp_min(1e-12)


class Shift(nn.Module):
    """Adds `sign` × a bias shared with another Shift: the pre-bias subtracted before encoding and added
    after decoding."""

    def __init__(self, bias: nn.Parameter, sign: float):
        super().__init__()
        self.bias, self.sign = bias, sign

    def forward(self, x):
        return x + self.sign * self.bias


def sae(shape: Sequence[int], latent_dim: int, head_dim: int | None = None) -> tuple[nn.Module, nn.Module]:
    """The sparse autoencoder of Gao et al. (2024), "Scaling and evaluating sparse autoencoders": a linear
    encoder and decoder around a learned pre-bias b (z = f(W_enc(x − b) + b_enc), x̂ = W_dec z + b),
    unit-norm decoder columns, and the encoder initialized as the decoder's transpose."""
    import torch
    from torch.nn.utils.parametrize import register_parametrization

    d = math.prod(shape)
    pre_bias = nn.Parameter(torch.zeros(d))
    dec = nn.Linear(latent_dim, d, bias=False)
    register_parametrization(dec, "weight", UnitColumns())
    enc = nn.Linear(d, head_dim or latent_dim)
    with torch.no_grad():
        enc.weight[:latent_dim].copy_(dec.weight.t())
        enc.bias.zero_()
    return (nn.Sequential(nn.Flatten(), Shift(pre_bias, -1.0), enc),
            nn.Sequential(dec, Shift(pre_bias, 1.0), nn.Unflatten(1, tuple(shape))))
