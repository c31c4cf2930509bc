"""DyMU in the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers: the encoder against the
unmodified tower and a naive per-window loop (eager and fused merges, every read lag), and
threshold finding on the model's own batches, in Python and from ``dymu-find-thresholds
--hf-model``."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from naive_qwen import naive_qwen
from qwen_vlms import FAMILIES, IMAGES, build, calibrated, pixels

import dymu
from dymu import DyMUError, Thresholds
from dymu.calibration.loop import find_thresholds
from dymu.encoder.qwen import QwenDyMUEncoder, expand_units
from dymu.engine.fused import StepConfig, steps_for
from dymu.integrations import hf_qwen_vl


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build(request.param)


def test_unmerged_encoder_is_the_tower(model):
    pix, grid = pixels([*IMAGES, (2, 4, 6)])  # three images and a two-step video
    visual = model.model.visual
    encoder = QwenDyMUEncoder(visual, [0] * len(visual.blocks))
    with torch.no_grad():
        expected = visual(pix, grid_thw=grid)
        out = encoder(pix, grid)
    assert out.host_lengths == (24, 8, 6, 6, 6)  # one row per frame: the video's two steps
    torch.testing.assert_close(expand_units(out), expected.pooler_output, atol=1e-5, rtol=1e-5)
    stacked = getattr(expected, "deepstack_features", None) or []  # Qwen3-VL's DeepStack
    assert len(out.features) == len(stacked)
    for head, rows in zip(out.features, stacked, strict=True):
        torch.testing.assert_close(expand_units(head), rows, atol=1e-5, rtol=1e-5)


def test_a_patch_embedding_that_is_not_a_plain_conv_runs_as_it_is(model):
    """The encoder computes the Conv3d patch embedding as one matrix product; another module
    in its place (here a wrapper scaling its output) is called as the tower would call it."""

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    visual = model.model.visual
    pix, grid = pixels(IMAGES[:2])
    original = visual.patch_embed
    visual.patch_embed = Scaled(original)
    try:
        encoder = QwenDyMUEncoder(visual, [0] * len(visual.blocks))
        with torch.no_grad():
            expected = visual(pix, grid_thw=grid).pooler_output
            got = expand_units(encoder(pix, grid))
    finally:
        visual.patch_embed = original
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["keep", "unmerge"])
def test_encoder_matches_naive_loop(model, positions):
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    encoder.positions = positions
    with torch.no_grad():
        out = encoder(pix, grid)
    taus = thresholds.merging_blocks()
    expected, deepstack = naive_qwen(model.model.visual, pix, grid, taus, positions == "unmerge")
    assert sum(out.host_lengths) < sum(len(g) for _, g in expected)  # something merged
    assert len(out.features) == len(deepstack)  # Qwen3-VL: one per DeepStack block
    for head, naive in zip(out.features, deepstack, strict=True):
        _same(head, naive)
    _same(out, expected)


def test_fused_merges_match_naive_loop(model):
    """Merges as one compiled step each (``dymu.engine.fused``), windows as its images and
    the rotary tables carried, with dead units kept for two blocks: the naive loop's tokens,
    groups and DeepStack outputs."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    encoder.fuse, encoder.read_lag = True, 2
    with torch.no_grad():
        out = encoder(pix, grid)
    assert all(steps_for(StepConfig(0, False, True), w).threshold.failed is None for w in (0, 1))
    expected, deepstack = naive_qwen(model.model.visual, pix, grid, thresholds.merging_blocks())
    assert sum(out.host_lengths) < sum(len(g) for _, g in expected)  # something merged
    for head, naive in zip(out.features, deepstack, strict=True):
        _same(head, naive)
    _same(out, expected)


def test_calibration_reads_lengths_later_too(model):
    """The batch rule with lengths read three blocks after each merge (its count, cap and
    last rank taken on the device): the thresholds of reading them at once."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    encoder = hf_qwen_vl.build_encoder(model, r_total=5 * len(model.model.visual.blocks))
    found = []
    for lag in (0, 3):
        encoder.read_lag = lag
        with torch.no_grad():
            found.append(encoder.calibrate({"pixel_values": pix, "image_grid_thw": grid}))
    (now, values, used), (later, values_later, used_later) = found
    assert torch.equal(used, used_later) and used.any()
    torch.testing.assert_close(values, values_later, atol=1e-6, rtol=0)
    assert now.host_lengths == later.host_lengths and torch.equal(now.groups, later.groups)


def test_every_read_lag_gives_the_same_output(model):
    """Lengths read 0, 1 or 3 blocks after a merge (dead units kept meanwhile) change
    nothing: tokens, groups, per-block counts, DeepStack outputs."""
    pix, grid = pixels([*IMAGES, (2, 4, 6)])
    thresholds = calibrated(model, {"pixel_values": pix, "image_grid_thw": grid})
    encoder = hf_qwen_vl.build_encoder(model, thresholds)
    outs = []
    for lag in (0, 1, 3):
        encoder.read_lag = lag
        with torch.no_grad():
            outs.append(encoder(pix, grid))
    first = outs[0]
    assert sum(first.host_lengths) < sum(first.host_inputs)  # something merged
    for out in outs[1:]:
        assert out.host_lengths == first.host_lengths
        assert torch.equal(out.groups, first.groups)
        assert torch.equal(out.block_lengths, first.block_lengths)
        torch.testing.assert_close(out.tokens, first.tokens, atol=1e-5, rtol=1e-5)
        for head, head0 in zip(out.features, first.features, strict=True):
            torch.testing.assert_close(head.tokens, head0.tokens, atol=1e-5, rtol=1e-5)


def _same(out, expected) -> None:
    """An encoder output equals the naive loop's (tokens, groups) per frame."""
    for frame, (tokens, groups) in enumerate(expected):
        assert out.host_lengths[frame] == tokens.shape[0]
        torch.testing.assert_close(
            out.tokens[frame, : tokens.shape[0]], tokens, atol=1e-5, rtol=1e-5
        )
        assert out.groups[frame, : len(groups)].tolist() == groups
        assert (out.groups[frame, len(groups) :] == -1).all()


def test_find_thresholds_on_processor_batches(model, tmp_path):
    batches = [
        {"pixel_values": p, "image_grid_thw": g}
        for p, g in (pixels(IMAGES, 1), pixels(IMAGES[:1], 2))
    ]
    encoder = hf_qwen_vl.build_encoder(model, r_total=2 * len(model.model.visual.blocks))
    found = find_thresholds(encoder, batches)
    assert found.count[0] == 2 and found.metadata["images"] == "4"
    found.save(tmp_path / "t.safetensors")
    merged = hf_qwen_vl.build_encoder(model, tmp_path / "t.safetensors")
    with torch.no_grad():
        assert sum(merged(*pixels(IMAGES)).host_lengths) < 24 + 8 + 6
    other = build("qwen2_vl" if "Qwen2_5" in type(model).__name__ else "qwen2_5_vl")
    with pytest.raises(DyMUError):
        hf_qwen_vl.build_encoder(other, found)


@pytest.mark.parametrize("name", FAMILIES)
def test_find_thresholds_cli_on_a_model_folder(name, tmp_path, photo_dir):
    """``dymu-find-thresholds --hf-model`` on a saved Qwen-VL: the folder's own image
    processor at dynamic resolution, batches of different patch counts, a file the model
    then takes."""
    from conftest import run_cli
    from transformers import Qwen2VLImageProcessor

    folder = tmp_path / name
    model = build(name)
    model.save_pretrained(folder)
    Qwen2VLImageProcessor(
        patch_size=14, merge_size=2, temporal_patch_size=2, max_pixels=60000
    ).save_pretrained(folder)
    out = tmp_path / "t.safetensors"
    proc = run_cli(
        [
            "--data",
            photo_dir / "images.json",
            "--hf-model",
            folder,
            "--batch-size",
            3,
            "--out",
            out,
        ],
        tmp_path,
    )
    assert "LLM tokens per frame" in proc.stdout
    found = Thresholds.load(out)
    images = int(found.metadata["images"])
    listed = len(json.loads((photo_dir / "images.json").read_text()))
    assert images == listed and found.count[0] > 0
    dymu.apply(model, thresholds=out)  # made for this tower: accepted
    dymu.remove(model)
    # dymu-encode on the same folder: token counts per photo and pictures of the groups
    photo = photo_dir / "img" / "coffee.jpg"
    cmd = [shutil.which("dymu-encode"), photo, "--hf-model", folder, "--thresholds", out]
    cmd += ["--show", tmp_path / "show", "--per-block"]
    shown = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "tokens" in shown.stdout and "per block" in shown.stdout
    assert (tmp_path / "show" / "coffee.dymu.png").is_file()


def test_batches_of_flat_patch_runs_concatenate():
    from dymu.sources.stream import Batch, stack_inputs

    items = [
        {"pixel_values": torch.ones(n, 5), "image_grid_thw": torch.tensor([[1, 2, n // 2]])}
        for n in (4, 8)
    ]
    batch = stack_inputs(items)
    assert batch["pixel_values"].shape == (12, 5) and batch["image_grid_thw"].shape == (2, 3)
    assert Batch(0, batch, []).size == 2
