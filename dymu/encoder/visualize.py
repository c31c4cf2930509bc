"""Pictures of what merged: every group of patches painted in its mean colour, outlined."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import DyMUError

_EDGE = (255, 255, 255)


def shown_image(pixels: torch.Tensor, preprocess: Callable | None = None) -> Image.Image:
    """The RGB picture the encoder saw: ``pixels (3, H, W)`` with the transform's
    normalisation undone (open_clip's preprocess ends with a ``Normalize``; an image
    processor wrapper carries ``mean``/``std``)."""
    mean, std = torch.zeros(3), torch.ones(3)
    steps = [preprocess, *getattr(preprocess, "transforms", [])]
    for step in steps:
        if hasattr(step, "mean") and hasattr(step, "std"):
            mean, std = torch.tensor(step.mean), torch.tensor(step.std)
    rgb = pixels.detach().float().cpu() * std[:, None, None] + mean[:, None, None]
    array = (rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def render_groups(
    image: Image.Image, groups: torch.Tensor, grid: tuple[int, int] | None = None
) -> Image.Image:
    """Paint each merged group in the mean colour of its patches and outline its border.

    ``groups`` holds one slot per patch in raster order over a ``grid`` of (rows, columns)
    patches; without ``grid``, a square one (``g * g`` entries, or ``g * g + 1`` with a class
    token first, which is ignored). Only which patches share a slot matters.
    """
    labels = groups.detach().cpu().long()
    if grid is None:
        side = math.isqrt(labels.numel())
        if side * side != labels.numel():
            labels = labels[1:]
            side = math.isqrt(labels.numel())
        if side * side != labels.numel() or side == 0:
            raise DyMUError(f"{groups.numel()} group entries do not form a square patch grid")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != labels.numel() or rows * cols == 0:
        raise DyMUError(f"{groups.numel()} group entries do not form a {rows}x{cols} patch grid")
    width, height = image.size
    if width % cols or height % rows or width // cols != height // rows:
        raise DyMUError(f"a {width}x{height} image does not split into {rows}x{cols} patches")
    patch = width // cols
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    cells = pixels.reshape(rows, patch, cols, patch, 3).mean(axis=(1, 3)).reshape(-1, 3)
    _, slot = torch.unique(labels, return_inverse=True)
    colour = torch.zeros(int(slot.max()) + 1, 3, dtype=torch.float64)
    colour.index_add_(0, slot, torch.from_numpy(cells))
    colour /= torch.bincount(slot).double()[:, None]
    painted = colour[slot].reshape(rows, cols, 3).numpy()
    mosaic = np.repeat(np.repeat(painted, patch, axis=0), patch, axis=1)
    out = Image.fromarray(mosaic.round().clip(0, 255).astype(np.uint8))
    _outline(ImageDraw.Draw(out), slot.reshape(rows, cols), patch)
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


def side_by_side(
    image: Image.Image, groups: torch.Tensor, caption: str, grid: tuple[int, int] | None = None
) -> Image.Image:
    """The input and its merged groups next to each other, with a caption underneath."""
    merged = render_groups(image, groups, grid)
    width, height = image.size
    sheet = Image.new("RGB", (2 * width + 8, height + 20), (0, 0, 0))
    sheet.paste(image.convert("RGB"), (0, 0))
    sheet.paste(merged, (width + 8, 0))
    ImageDraw.Draw(sheet).text((4, height + 4), caption, fill=_EDGE)
    return sheet


def merge_picture(encoder, inputs, out, caption: str, index: int = 0) -> Image.Image:
    """Image ``index`` of an encoder's batch beside its merged groups: every patch of the
    tower's own grid (SigLIP2: each image's), prefix tokens left out."""
    first = 0 if encoder.drop_cls else encoder.tower.num_prefix_tokens
    return _picture(
        encoder.tower, inputs, out.groups[index], first, encoder.preprocess, caption, index
    )


def tome_picture(
    model, inputs, index: int = 0, preprocess: Callable | None = None, caption: str = ""
) -> Image.Image:
    """Image ``index`` of the last batch a model patched with ``apply_tome(...,
    trace_source=True)`` saw, beside its merged groups (as ``dymu-encode --show`` draws them).
    ``preprocess`` is the transform that made ``inputs`` (its mean/std undo the normalisation;
    default: the tower family's)."""
    state = getattr(model, "dymu_tome", None)
    if state is None or state.groups is None:
        raise DyMUError("patch with dymu.apply_tome(model, trace_source=True) and run it first")
    tower = state.tower
    if index >= state.groups.shape[0]:
        raise DyMUError(f"the last batch had {state.groups.shape[0]} images, not {index + 1}")
    if not caption:
        caption = f"{int(state.lengths[index])} tokens"
    preprocess = preprocess or tower.preprocess()
    prefix = tower.num_prefix_tokens
    return _picture(tower, inputs, state.groups[index], prefix, preprocess, caption, index)


def _picture(tower, inputs, groups, first, preprocess, caption, index) -> Image.Image:
    rows, cols = tower.patch_grid(inputs, index)
    groups = groups[first : first + rows * cols]
    image = shown_image(tower.image_tensor(inputs, index), preprocess)
    return side_by_side(image, groups, caption, (rows, cols))
