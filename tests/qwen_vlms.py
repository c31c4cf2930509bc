"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (random weights) and their inputs, built the
way the models' processors lay them out: flat patches with ``grid_thw``, and prompts whose
image and video placeholders sit between vision start/end tokens; thresholds for them that
merge some pairs (``calibrated``) or none (``never``)."""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from dymu import Thresholds
from dymu.integrations import hf_qwen_vl

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
IMAGE, VIDEO, START, END, PAD = 290, 291, 292, 293, 0
PATCH, MERGE, TEMPORAL = 14, 2, 2
TEXT = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 3]},
)
TOKENS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
    vision_end_token_id=END,
)  # fmt: skip


def build(family: str, patch: int = PATCH):
    """A tiny model in fp32; Qwen2.5-VL with 56-pixel windows (2x2 units) and two of its
    four blocks attending over whole frames; Qwen3-VL with a 4x4 learned position table,
    DeepStack after blocks 0 and 1 and interleaved M-RoPE. ``patch``: pixels per patch side
    (Qwen3-VL's own is 16)."""
    torch.manual_seed(0)
    common = dict(patch_size=patch, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    if family == "qwen2_vl":
        vision = dict(depth=3, embed_dim=32, hidden_size=48, mlp_ratio=2, num_heads=2, **common)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=TEXT, **TOKENS)
        model = Qwen2VLForConditionalGeneration(cfg)
    elif family == "qwen3_vl":
        vision = dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
            num_position_embeddings=16, deepstack_visual_indexes=[0, 1], **common,
        )  # fmt: skip
        rope = {**TEXT["rope_parameters"], "mrope_section": [2, 2, 2], "mrope_interleaved": True}
        text = {**TEXT, "head_dim": 12, "num_hidden_layers": 3, "rope_parameters": rope}
        cfg = Qwen3VLConfig(vision_config=vision, text_config=text, **TOKENS)
        model = Qwen3VLForConditionalGeneration(cfg)
    else:
        vision = dict(
            depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
            window_size=56, fullatt_block_indexes=[1, 3], **common,
        )  # fmt: skip
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=TEXT, **TOKENS)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def pixels(grids: list[tuple[int, int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flat patches for frames of ``(t, h, w)`` patches each, and their grid."""
    grid = torch.tensor(grids)
    gen = torch.Generator().manual_seed(seed)
    rows = int(grid.prod(-1).sum())
    return torch.randn(rows, 3 * TEMPORAL * PATCH * PATCH, generator=gen), grid


def units(grid: tuple[int, int, int]) -> int:
    """LLM tokens of one image or video: its 2x2 units."""
    t, h, w = grid
    return t * h * w // MERGE**2


def prompts(rows: list[list[tuple[str, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``; a row is ``("text", n)``,
    ``("image", n)`` or ``("video", n)`` pieces (visual pieces between start/end tokens)."""
    built = []
    for row in rows:
        ids: list[int] = []
        for kind, n in row:
            if kind == "text":
                ids += [1 + (i % 40) for i in range(n)]
            else:
                ids += [START] + [IMAGE if kind == "image" else VIDEO] * n + [END]
        built.append(ids)
    width = max(len(r) for r in built)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in built])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in built])
    return ids, mask


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """``mm_token_type_ids`` as the processors give them: 0 text, 1 image, 2 video."""
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()


IMAGES = [(1, 8, 12), (1, 4, 8), (1, 6, 4)]


def calibrated(model, inputs: dict, r: int = 2, margin: float = 0.05) -> Thresholds:
    """Thresholds from one calibration batch, raised by ``margin`` (so some pairs merge and
    some do not)."""
    encoder = hf_qwen_vl.build_encoder(model, r_total=r * len(model.model.visual.blocks))
    with torch.no_grad():
        _, values, used = encoder.calibrate(inputs)
    return Thresholds(
        values + margin, used.long(), torch.tensor(encoder.r), encoder.identity.metadata()
    )


def never(model) -> Thresholds:
    encoder = hf_qwen_vl.build_encoder(model, r_total=len(model.model.visual.blocks))
    r = torch.tensor(encoder.r)
    return Thresholds.from_values(torch.ones(len(r)), r, encoder.identity.metadata())


def case_inputs(name: str, model=None):
    """Model inputs: two images in one prompt, a left-padded batch of two, a video (Qwen3-VL
    puts each temporal patch of a video between its own start and end tokens)."""
    if name == "two_images":
        pix, grid = pixels(IMAGES[:2])
        rows = [[("text", 3), ("image", 24), ("text", 2), ("image", 8), ("text", 2)]]
    elif name == "batch":
        pix, grid = pixels([IMAGES[0], IMAGES[2]])
        rows = [[("text", 2), ("image", 24), ("text", 3)], [("image", 6), ("text", 4)]]
    else:
        pix, grid = pixels([(2, 4, 8)])
        if "Qwen3" in type(model).__name__:
            video = [("video", units((1, 4, 8))), ("text", 1), ("video", units((1, 4, 8)))]
        else:
            video = [("video", units((2, 4, 8)))]
        rows = [[("text", 2), *video, ("text", 3)]]
    ids, mask = prompts(rows)
    kind = "video" if name == "video" else "image"
    pixel_arg = "pixel_values_videos" if kind == "video" else "pixel_values"
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": token_types(ids),
        pixel_arg: pix,
        f"{kind}_grid_thw": grid,
    }
