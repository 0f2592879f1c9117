"""Pictures: labelled, upscaled image grids, for TensorBoard and as PNGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MIN_SIDE = 64  # tiles are upscaled (nearest) until an image is at least this many pixels high and wide


def picture(rows: list[torch.Tensor], labels: list[str] | None = None, frames: torch.Tensor | None = None,
            title: str | None = None) -> torch.Tensor:
    """Equal-length rows of images (N, C, H, W) in [0, 1] as one RGB picture (3, H, W): each image
    upscaled to at least MIN_SIDE pixels, white gaps, a label left of each row, an optional title, and a
    red frame around the images that `frames` (one bool per image) marks."""
    tiles = torch.cat(rows).detach().float().clamp(0, 1).cpu()
    if tiles.shape[1] != 3:  # grey, or the mean of channels that are not RGB
        tiles = tiles.mean(1, keepdim=True)
    scale = max(1, math.ceil(MIN_SIDE / min(tiles.shape[-2:])))
    tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest").expand(-1, 3, -1, -1).clone()
    if frames is not None:
        red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        for i in frames.cpu().bool().nonzero().flatten():
            t = tiles[i]  # a view: the frame is drawn into the picture
            t[:, :2], t[:, -2:], t[:, :, :2], t[:, :, -2:] = red, red, red, red
    grid = make_grid(tiles, nrow=len(rows[0]), padding=2, pad_value=1.0)
    if not labels and not title:
        return grid
    from PIL import Image, ImageDraw

    font = _font()
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    margin = 8 + max((int(width(t, font=font)) for t in labels or [""]))
    lines = _wrap(title, lambda t: width(t, font=font), grid.shape[2] + (margin if labels else 0) - 8) if title else []
    top = 4 + 18 * len(lines) if lines else 0
    canvas = Image.new("RGB", (grid.shape[2] + (margin if labels else 0), grid.shape[1] + top), "white")
    canvas.paste(to_image(grid), (margin if labels else 0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 4 + 18 * i), line, fill="black", font=font)
    row_height = tiles.shape[-2] + 2
    for i, label in enumerate(labels or []):
        draw.text((4, top + 2 + i * row_height + row_height // 2 - 7), label, fill="black", font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


def make_grid(tiles: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """Images (N, C, H, W) as one (3, H', W') grid of `nrow` a row, `padding` pixels of `pad_value` around
    each, as torchvision.utils.make_grid lays it out: kept here because importing torchvision would
    double the start-up of a command that draws a picture."""
    if tiles.shape[1] == 1:
        tiles = tiles.expand(-1, 3, -1, -1)
    if len(tiles) == 1:
        return tiles[0]
    n, c, h, w = tiles.shape
    cols, step_h, step_w = min(nrow, n), h + padding, w + padding
    out = tiles.new_full((c, math.ceil(n / cols) * step_h + padding, cols * step_w + padding), pad_value)
    for i, tile in enumerate(tiles):
        top, left = i // cols * step_h + padding, i % cols * step_w + padding
        out[:, top:top + h, left:left + w] = tile
    return out


def to_image(grid: torch.Tensor):
    """A (3, H, W) picture in [0, 1] as an 8-bit PIL image, rounded as torchvision's save_image rounds."""
    from PIL import Image

    pixels = grid.detach().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
    return Image.fromarray(pixels.numpy())


def _wrap(text: str, width, limit: float) -> list[str]:
    """Words of `text` in lines no wider than `limit` pixels (a longer word keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and width(f"{lines[-1]} {word}") <= limit:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_png(grid: torch.Tensor, path: Path) -> Path:
    """Writes a picture as PNG and says so (with its size in pixels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    to_image(grid).save(path)
    print(f"wrote {path} ({grid.shape[2]}×{grid.shape[1]} px)")
    return path


def image_loggers(trainer):
    """The trainer's loggers that can show images (TensorBoard's SummaryWriter)."""
    return [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]


def publish(trainer, tag: str, grid: torch.Tensor, png: Path | None) -> None:
    """Sends a picture to TensorBoard at the current step and (rank 0) writes it as PNG."""
    for writer in image_loggers(trainer):
        writer.add_image(tag, grid, trainer.global_step)
    if png is not None and trainer.is_global_zero:
        png.parent.mkdir(parents=True, exist_ok=True)
        to_image(grid).save(png)


def fixed_examples(trainer, split: str, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n examples of a split as model input on `device` (the same every epoch)."""
    x, y = trainer.datamodule.splits[split]
    return trainer.precision_plugin.convert_input(trainer.datamodule.transform(x[:n]).to(device)), y[:n]


def square(x: torch.Tensor) -> list[torch.Tensor]:
    """n images as the rows of a near-square grid (the last row may be short)."""
    cols = max(1, math.ceil(len(x) ** 0.5))
    return [x[i:i + cols] for i in range(0, len(x), cols)]


def code_usage(ae, frequency: torch.Tensor) -> torch.Tensor:
    """One tile per codebook vector, most used first: the decoding of that code at every position of the
    code; codes no validation example used framed in red."""
    order = frequency.argsort(descending=True, stable=True)
    codes = ae.bottleneck.codebook.detach()[order.to(ae.bottleneck.codebook.device)]
    z = codes.view(*codes.shape, *[1] * len(ae.grid)).expand(*codes.shape, *ae.grid)
    tiles = torch.cat([ae.likelihood.mean(ae.decode(chunk)) for chunk in z.split(256)])
    unused = frequency[order] == 0
    return picture(square(tiles), frames=torch.cat(square(unused.view(-1, 1, 1, 1))).flatten(),
                   title=f"{len(unused)} codes by use on the validation split; {int(unused.sum())} unused (red)")


def decoder_features(ae, frequency: torch.Tensor) -> torch.Tensor:
    """One tile per latent unit, most often active first: the decoder's output for that unit on alone
    (at 1) minus its output at 0, all tiles on one shared grey scale (so a unit that does little looks
    flat); units that never fired on the validation set framed in red."""
    order = frequency.argsort(descending=True, stable=True)
    device = next(ae.parameters()).device
    eye = torch.eye(ae.latent_dim, device=device)[order.to(device)]
    base = ae.likelihood.mean(ae.decode(torch.zeros_like(eye[:1])))
    tiles = ae.likelihood.mean(ae.decode(eye)) - base
    span = tiles.abs().max().clamp_min(1e-8)
    tiles = tiles / (2 * span) + 0.5  # 0.5 grey: no change from the empty code
    dead = frequency[order] == 0
    return picture(square(tiles), frames=torch.cat(square(dead.view(-1, 1, 1, 1))).flatten(),
                   title=f"{len(dead)} units by activation frequency; {int(dead.sum())} dead (red)")
