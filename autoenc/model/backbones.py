"""Encoder/decoder backbones built from the data's (C, H, W): mlp, conv (any depth, a norm), resnet, sae; decoders
return logits."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
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


def _images(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        from autoenc.util.errors import UserError

        raise UserError(f"net={name} needs images (C, H, W); this data's examples have shape {tuple(shape)}: use net=mlp")
    return tuple(shape)


def _halvings(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """(H, W) before and after each of n stride-2 3×3 convolutions (padding 1: each halves, rounding up)."""
    sizes = [(h, w)]
    for _ in range(n):
        sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    return sizes


def _norm(name: str | None, channels: int, groups: int = 32) -> list[nn.Module]:
    """A normalization layer by torch.nn class name (GroupNorm: gcd(groups, channels) groups); none for null."""
    if not name:
        return []
    if name == "GroupNorm":  # its signature differs: (num_groups, num_channels)
        return [nn.GroupNorm(math.gcd(groups, channels), channels)]
    return [getattr(nn, name)(channels)]


def _channels_last(module, args):
    """A forward pre-hook: the input in channels-last memory order (faster convolutions on GPUs with tensor cores)."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


LATENTS = ("flat", "grid")


def _latent(latent: str, prev: int, grid: tuple[int, int], head_dim: int, latent_dim: int, activation: str):
    """The encoder's last layers and the decoder's first: `flat`, a Linear head from the flattened feature
    map (one code vector per example); `grid`, a 1×1 convolution to head_dim channels at each position of
    the map (a code vector per position, as VQ-VAE and latent-diffusion autoencoders have), mirrored."""
    if latent not in LATENTS:
        from autoenc.util.errors import UserError

        raise UserError(f"net.latent={latent} is invalid; choose flat (one code per example) or grid (a code "
                        "per position of the last feature map)")
    if latent == "grid":
        return [nn.Conv2d(prev, head_dim, 1)], [nn.Conv2d(latent_dim, prev, 1), _act(activation)]
    flat = prev * grid[0] * grid[1]
    return ([nn.Flatten(), nn.Linear(flat, head_dim)],
            [nn.Linear(latent_dim, flat), _act(activation), nn.Unflatten(1, (prev, *grid))])


def _finish(enc: list, dec: list, at: int, channels_last: bool) -> tuple[nn.Module, nn.Module]:
    """The two Sequentials; with channels_last, their weights and the inputs of the encoder and of the
    decoder's layer `at` are channels-last (hooks: the parameter names, and so checkpoints, stay the same)."""
    encoder, decoder = nn.Sequential(*enc), nn.Sequential(*dec)
    if channels_last:
        encoder.to(memory_format=torch.channels_last).register_forward_pre_hook(_channels_last)
        decoder.to(memory_format=torch.channels_last)
        decoder[at].register_forward_pre_hook(_channels_last)
    return encoder, decoder


def conv(shape: Sequence[int], latent_dim: int, head_dim: int | None = None, channels: Sequence[int] = (32, 64),
         activation: str = "ReLU", norm: str | None = None, groups: int = 32,
         channels_last: bool = False, latent: str = "flat") -> tuple[nn.Module, nn.Module]:
    """One stride-2 3×3 convolution per entry of `channels` (each halves H, W, rounding up), each followed by
    `norm` (a torch.nn class name: BatchNorm2d, GroupNorm, …) if set and the activation, to a head of
    head_dim (default latent_dim) units, flat or at each position (`latent`); the decoder mirrors it with
    transposed convolutions."""
    c, h, w = _images(shape, "conv")
    sizes = _halvings(h, w, len(channels))
    enc, prev = [], c
    for ch in channels:
        enc += [nn.Conv2d(prev, ch, 3, stride=2, padding=1, bias=not norm), *_norm(norm, ch, groups), _act(activation)]
        prev = ch
    head, dec = _latent(latent, prev, sizes[-1], head_dim or latent_dim, latent_dim, activation)
    enc += head
    outs = [*reversed(channels[:-1]), c]
    for i, ch in enumerate(outs):
        (th, tw), (sh, sw) = sizes[-2 - i], sizes[-1 - i]
        # A 3×3 stride-2 transposed conv with padding 1 gives 2n − 1 + output_padding.
        last = i == len(outs) - 1
        dec.append(nn.ConvTranspose2d(prev, ch, 3, stride=2, padding=1, bias=last or not norm,  # a norm's shift
                                      output_padding=(th - 2 * sh + 1, tw - 2 * sw + 1)))  # replaces a bias
        if not last:
            dec += [*_norm(norm, ch, groups), _act(activation)]
        prev = ch
    return _finish(enc, dec, len(head) + 1, channels_last)


class Block(nn.Module):
    """A residual block, torchvision's BasicBlock: two 3×3 convolutions with norms, added to the input
    (through a 1×1 convolution where the width or size changes), then the activation."""

    def __init__(self, a: int, b: int, stride: int, norm: str | None, groups: int, activation: str):
        super().__init__()
        bias = not norm  # a norm's shift makes a bias redundant
        self.body = nn.Sequential(nn.Conv2d(a, b, 3, stride, 1, bias=bias), *_norm(norm, b, groups), _act(activation),
                                  nn.Conv2d(b, b, 3, 1, 1, bias=bias), *_norm(norm, b, groups))
        self.skip = (nn.Identity() if a == b and stride == 1 else
                     nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=bias), *_norm(norm, b, groups)))
        self.act = _act(activation)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


def resnet(shape: Sequence[int], latent_dim: int, head_dim: int | None = None,
           widths: Sequence[int] = (32, 64, 128, 256), blocks: int | Sequence[int] = 1, norm: str | None = "BatchNorm2d",
           groups: int = 32, activation: str = "ReLU", channels_last: bool = False,
           latent: str = "flat") -> tuple[nn.Module, nn.Module]:
    """A residual encoder: a 3×3 stem, then one stage per entry of `widths`, each `blocks` residual blocks
    (the first of stride 2), to a head of head_dim units, flat or at each position (`latent`). The decoder mirrors it: each stage
    upsamples (nearest) to the encoder's size there, then its residual blocks; a 3×3 convolution gives the
    logits. Any H, W (odd, non-square): the sizes are the encoder's own."""
    c, h, w = _images(shape, "resnet")
    blocks = [blocks] * len(widths) if isinstance(blocks, int) else list(blocks)
    if len(blocks) != len(widths) or min(blocks) < 1:
        from autoenc.util.errors import UserError

        raise UserError(f"net.blocks={blocks} must be a positive integer, or one per stage of net.widths={list(widths)}")
    sizes = _halvings(h, w, len(widths))
    enc, prev = [nn.Conv2d(c, widths[0], 3, 1, 1, bias=not norm), *_norm(norm, widths[0], groups), _act(activation)], widths[0]
    for width, n in zip(widths, blocks):
        enc += [Block(prev, width, 2, norm, groups, activation)] + [Block(width, width, 1, norm, groups, activation)
                                                                     for _ in range(n - 1)]
        prev = width
    head, dec = _latent(latent, prev, sizes[-1], head_dim or latent_dim, latent_dim, activation)
    enc += head
    for i in reversed(range(len(widths))):
        out = widths[max(i - 1, 0)]
        dec += [nn.Upsample(size=sizes[i], mode="nearest"), Block(prev, out, 1, norm, groups, activation)]
        dec += [Block(out, out, 1, norm, groups, activation) for _ in range(blocks[i] - 1)]
        prev = out
    dec.append(nn.Conv2d(prev, c, 3, 1, 1))
    return _finish(enc, dec, len(head) + 1, channels_last)


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


class Residual(nn.Module):
    """VQ-VAE's residual block: x + 1×1(ReLU(3×3(ReLU(x)))) (van den Oord et al. 2017, sec. 4.1)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, 1, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        return x + self.body(x)


def vqvae(shape: Sequence[int], latent_dim: int, head_dim: int | None = None, hidden: int = 256,
          residual_hidden: int = 256, blocks: int = 2) -> tuple[nn.Module, nn.Module]:
    """The VQ-VAE paper's encoder and decoder (van den Oord et al. 2017, sec. 4.1): two stride-2 4×4
    convolutions of `hidden` channels and `blocks` residual blocks to a 1×1 convolution giving head_dim
    values at each position of an H/4 × W/4 grid; the decoder mirrors it with stride-2 4×4 transposed
    convolutions. H and W must be multiples of 4."""
    c, h, w = _images(shape, "vqvae")
    if h % 4 or w % 4:
        from autoenc.util.errors import UserError

        raise UserError(f"net=vqvae needs images whose sides are multiples of 4; these are {h}×{w} (use net=conv)")
    stack = [Residual(hidden, residual_hidden) for _ in range(blocks)]
    encoder = nn.Sequential(nn.Conv2d(c, hidden, 4, 2, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 4, 2, 1), *stack,
                            nn.ReLU(), nn.Conv2d(hidden, head_dim or latent_dim, 1))
    decoder = nn.Sequential(nn.Conv2d(latent_dim, hidden, 3, 1, 1),
                            *[Residual(hidden, residual_hidden) for _ in range(blocks)], nn.ReLU(),
                            nn.ConvTranspose2d(hidden, hidden, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(hidden, c, 4, 2, 1))
    return encoder, decoder
