"""Tiny transformers LLaVA-NeXT (CLIP + Llama) and LLaVA-OneVision (SigLIP + Qwen2) models
built from configs, real AnyRes inputs from the models' own image processors, and prompts
whose placeholder counts come from the unmodified model's own arrangement."""

from __future__ import annotations

import numpy as np
import torch
from conftest import TINY_LM
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from dymu import Thresholds

IMAGE, VIDEO, PAD = 60, 61, 0
PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # 32-pixel crops: 2 or 4 crops plus the base view
TOWER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)


def build(family: str):
    torch.manual_seed(0)
    if family == "next":
        cfg = LlavaNextConfig(
            vision_config=CLIPVisionConfig(**TOWER),
            text_config=LlamaConfig(**TINY_LM),
            image_token_id=IMAGE,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        return LlavaNextForConditionalGeneration(cfg).eval()
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**TOWER),
        text_config=Qwen2Config(**TINY_LM),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",  # crops beyond one view's area get interpolated
    )
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def pixels(family: str, images, one_prompt: bool = False) -> dict:
    """The model's own image processor on PIL images (AnyRes crops, image sizes); with
    ``one_prompt`` OneVision's processor treats them as one multi-image prompt."""
    if family == "next":
        proc = LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=PINPOINTS,
        )
        return dict(proc(images, return_tensors="pt"))
    proc = LlavaOnevisionImageProcessor(
        size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS
    )
    return dict(proc([images] if one_prompt else images, return_tensors="pt"))


def video(frames) -> torch.Tensor:
    """``(1, F, 3, 32, 32)`` frames, normalised as SigLIP expects."""
    arrays = [np.asarray(f.convert("RGB").resize((32, 32)), dtype=np.float32) for f in frames]
    stack = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (F, 3, 32, 32)
    return ((stack / 255 - 0.5) / 0.5)[None]


def feature_counts(model, inputs: dict) -> tuple[list[int], int]:
    """Placeholder tokens per image, and per video, from the unmodified model's own code."""
    vlm, counts, video_count = model.model, [], 0
    with torch.no_grad():
        if "pixel_values" in inputs:
            extra = {k: v for k, v in inputs.items() if k in ("image_sizes", "batch_num_images")}
            feats = vlm.get_image_features(inputs["pixel_values"], return_dict=True, **extra)
            counts = [f.shape[0] for f in feats.pooler_output]
        if "pixel_values_videos" in inputs:
            feats = vlm.get_video_features(inputs["pixel_values_videos"], return_dict=True)
            video_count = feats.pooler_output.shape[1]
    return counts, video_count


def prompts(rows: list[list[tuple[str, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``; a row is a list of
    ``("text", n)``, ``("image", n)`` or ``("video", n)`` pieces."""
    token = {"image": IMAGE, "video": VIDEO}
    built = []
    for row in rows:
        ids: list[int] = []
        for kind, n in row:
            ids += [token[kind]] * n if kind in token else [1 + (i % 40) for i in range(n)]
        built.append(ids)
    width = max(len(r) for r in built)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in built])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in built])
    return ids, mask


def never_merge() -> Thresholds:
    return Thresholds.from_values(torch.ones(3), torch.tensor([2, 2, 2]), {"model": "tiny-tome"})
