"""Merge pictures: colours and outlines checked against a loop over a hand-built grid."""

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

import dymu
from dymu import DyMUError
from dymu.encoder.visualize import render_groups, shown_image

GRID, PATCH = 4, 3


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (GRID * PATCH, GRID * PATCH, 3), np.uint8))


def test_groups_are_painted_in_their_mean_colour_and_outlined():
    image = _image()
    # a class token first (ignored), then one slot per patch in raster order
    labels = [7, 7, 2, 2, 7, 5, 5, 2, 9, 9, 9, 2, 1, 1, 1, 1]
    out = np.asarray(render_groups(image, torch.tensor([0, *labels])), dtype=np.int64)
    pixels = np.asarray(image, dtype=np.float64)
    cell_mean = {}
    for p in range(GRID * GRID):
        r, c = divmod(p, GRID)
        block = pixels[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
        cell_mean[p] = block.reshape(-1, 3).mean(0)
    for p, label in enumerate(labels):
        members = [q for q, other in enumerate(labels) if other == label]
        expected = np.round(np.mean([cell_mean[q] for q in members], axis=0))
        r, c = divmod(p, GRID)
        centre = out[r * PATCH + 1, c * PATCH + 1]
        assert np.abs(centre - expected).max() <= 1, (p, centre, expected)
        if c > 0:  # the left edge of a patch is outlined exactly where the group changes
            edge = out[r * PATCH + 1, c * PATCH]
            changes = labels[p - 1] != label
            assert (edge == 255).all() if changes else np.array_equal(edge, centre)


def test_without_class_token_and_identity_groups():
    image = _image(1)
    out = np.asarray(render_groups(image, torch.arange(GRID * GRID)), dtype=np.float64)
    cells = np.asarray(image, dtype=np.float64).reshape(GRID, PATCH, GRID, PATCH, 3).mean((1, 3))
    centres = out[1::PATCH, 1::PATCH]
    assert np.abs(centres - np.round(cells)).max() <= 1


def test_shape_errors_name_the_problem():
    with pytest.raises(DyMUError, match="square patch grid"):
        render_groups(_image(), torch.arange(7))
    with pytest.raises(DyMUError, match="does not split"):
        render_groups(Image.new("RGB", (10, 10)), torch.arange(GRID * GRID))


def test_shown_image_undoes_the_normalisation(photos):
    encoder = dymu.build_encoder(f"{TINY}-tome", None)
    photo = photos[0].resize((64, 64))
    back = shown_image(encoder.preprocess(photo), encoder.preprocess)
    diff = np.abs(np.asarray(back, np.int64) - np.asarray(photo, np.int64))
    assert back.size == (64, 64) and diff.max() <= 1
