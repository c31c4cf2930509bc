"""Model names: ``<open_clip name>-tome[-<K>out][-linear|-reverse-linear]``, resolved here only.

The open_clip name may be a CLIP ViT or a tower with a timm ViT trunk (SigLIP, SigLIP2).
``K`` counts patch tokens, so ``r_total = patches - K`` whatever the prefix tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DyMUError

_NAME = re.compile(r"^(?P<base>.+?)-tome(?:-(?P<keep>\d+)out)?(?P<sched>-linear|-reverse-linear)?$")


@dataclass(frozen=True)
class ModelSpec:
    """What a dymu model name means: the open_clip base and the default merging budget."""

    name: str
    base: str
    num_blocks: int
    num_patches: int
    r_total: int
    schedule: str
    num_prefix_tokens: int = 1


def resolve_name(name: str) -> ModelSpec:
    """Parse a dymu name; a bare ``-tome`` keeps a third of the patches on average."""
    match = _NAME.match(name)
    if match is None:
        raise DyMUError(
            f"unknown model name {name!r}: dymu names look like '<open_clip model>-tome', "
            "e.g. 'ViT-L-14-336-tome' or 'ViT-B-16-tome-100out-linear'"
        )
    base = match["base"]
    import open_clip  # imported here: ``import dymu.encoder.names`` stays light

    cfg = open_clip.get_model_config(base)
    if cfg is None:
        raise DyMUError(
            f"unknown model name {name!r}: {base!r} is not an open_clip model "
            "(see open_clip.list_models())"
        )
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        num_blocks, num_patches, prefix = _timm_geometry(base, vision["timm_model_name"])
    else:
        image, patch = _pair(vision["image_size"]), _pair(vision["patch_size"])
        num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
        num_blocks, prefix = int(vision["layers"]), 1
    keep = int(match["keep"]) if match["keep"] else num_patches // 3
    if keep == 0:
        raise DyMUError(
            f"{name!r} keeps no tokens: -<K>out needs K from 1 to {num_patches} "
            f"({base} has {num_patches} patches)"
        )
    if keep > num_patches:
        raise DyMUError(f"{name!r} keeps {keep} tokens but {base} has {num_patches} patches")
    schedule = (match["sched"] or "-constant")[1:].replace("-", "_")
    return ModelSpec(name, base, num_blocks, num_patches, num_patches - keep, schedule, prefix)


def _timm_geometry(base: str, timm_name: str) -> tuple[int, int, int]:
    """(blocks, patches, prefix tokens) of a timm trunk, built on the meta device (no memory,
    no weights) so the name is checked before anything is loaded."""
    import torch

    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise DyMUError(f"{base!r} has a timm tower: install timm (pip install timm)") from None
    try:
        with torch.device("meta"):
            trunk = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except Exception as exc:  # unknown to the installed timm, or bad arguments
        raise DyMUError(f"cannot build {base!r}'s timm tower {timm_name!r}: {exc}") from None
    if not isinstance(trunk, VisionTransformer):
        raise DyMUError(f"{base!r} has a timm {type(trunk).__name__} tower; dymu merges ViT towers")
    return len(trunk.blocks), trunk.patch_embed.num_patches, int(trunk.num_prefix_tokens)


def _pair(v: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
