"""Pictures of what merged: every group of patches painted in its mean colour, outlined."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import DyMUError

_EDGE = (255, 255, 255)


def shown_image(pixels: torch.Tensor, preprocess: Callable | None = None) -> Image.Image:
    """The RGB picture the encoder saw: ``pixels (3, H, W)`` with the transform's
    ``Normalize`` undone (open_clip's preprocess ends with one)."""
    mean, std = torch.zeros(3), torch.ones(3)
    for step in getattr(preprocess, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean, std = torch.tensor(step.mean), torch.tensor(step.std)
    rgb = pixels.detach().float().cpu() * std[:, None, None] + mean[:, None, None]
    array = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def render_groups(image: Image.Image, groups: torch.Tensor) -> Image.Image:
    """Paint each merged group in the mean colour of its patches and outline its border.

    ``groups`` holds one slot per patch in raster order (``g * g`` entries, or ``g * g + 1``
    with a class token first, which is ignored); only which patches share a slot matters.
    """
    labels = groups.detach().cpu().long()
    grid = math.isqrt(labels.numel())
    if grid * grid != labels.numel():
        labels = labels[1:]
        grid = math.isqrt(labels.numel())
    if grid * grid != labels.numel() or grid == 0:
        raise DyMUError(f"{groups.numel()} group entries do not form a square patch grid")
    width, height = image.size
    if width != height or width % grid:
        raise DyMUError(f"a {width}x{height} image does not split into {grid}x{grid} patches")
    patch = width // grid
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    cells = pixels.reshape(grid, patch, grid, patch, 3).mean(axis=(1, 3)).reshape(-1, 3)
    _, slot = torch.unique(labels, return_inverse=True)
    colour = torch.zeros(int(slot.max()) + 1, 3, dtype=torch.float64)
    colour.index_add_(0, slot, torch.from_numpy(cells))
    colour /= torch.bincount(slot).double()[:, None]
    painted = colour[slot].reshape(grid, grid, 3).numpy()
    mosaic = np.repeat(np.repeat(painted, patch, axis=0), patch, axis=1)
    out = Image.fromarray(mosaic.round().clip(0, 255).astype(np.uint8))
    _outline(ImageDraw.Draw(out), slot.reshape(grid, grid), patch)
    return out


def _outline(draw: ImageDraw.ImageDraw, slot: torch.Tensor, patch: int) -> None:
    """A line on every patch edge between two different groups."""
    rows, cols = torch.nonzero(slot[:, 1:] != slot[:, :-1], as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        x = (c + 1) * patch
        draw.line([(x, r * patch), (x, (r + 1) * patch)], fill=_EDGE)
    rows, cols = torch.nonzero(slot[1:, :] != slot[:-1, :], as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        y = (r + 1) * patch
        draw.line([(c * patch, y), ((c + 1) * patch, y)], fill=_EDGE)


def side_by_side(image: Image.Image, groups: torch.Tensor, caption: str) -> Image.Image:
    """The input and its merged groups next to each other, with a caption underneath."""
    merged = render_groups(image, groups)
    width, height = image.size
    sheet = Image.new("RGB", (2 * width + 8, height + 20), (0, 0, 0))
    sheet.paste(image.convert("RGB"), (0, 0))
    sheet.paste(merged, (width + 8, 0))
    ImageDraw.Draw(sheet).text((4, height + 4), caption, fill=_EDGE)
    return sheet
