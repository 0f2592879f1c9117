"""Encoder/decoder backbones built from the data's (C, H, W); decoders return logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def _act(name: str) -> nn.Module:
    return getattr(nn, name)()


def mlp(shape: Sequence[int], latent_dim: int, head_dim: int | None = None,
        hidden: Sequence[int] = (256, 128), activation: str = "ReLU") -> tuple[nn.Module, nn.Module]:
    """Fully connected encoder (input → hidden → head_dim, default latent_dim) and its mirror decoder."""
    d = math.prod(shape)
    widths = [d, *hidden]
    enc = [nn.Flatten()]
    for a, b in zip(widths, widths[1:]):
        enc += [nn.Linear(a, b), _act(activation)]
    enc.append(nn.Linear(widths[-1], head_dim or latent_dim))
    dec_widths = [latent_dim, *reversed(hidden)]
    dec = []
    for a, b in zip(dec_widths, dec_widths[1:]):
        dec += [nn.Linear(a, b), _act(activation)]
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
