"""Model names: ``<open_clip name>-tome[-<K>out][-linear|-reverse-linear]``, resolved here only."""

from __future__ import annotations

import re
from dataclasses import dataclass

import open_clip

from .errors import DyMUError

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


def resolve_name(name: str) -> ModelSpec:
    """Parse a dymu name; a bare ``-tome`` keeps a third of the patches on average."""
    match = _NAME.match(name)
    if match is None:
        raise DyMUError(
            f"unknown model name {name!r}: dymu names look like '<open_clip model>-tome', "
            "e.g. 'ViT-L-14-336-tome' or 'ViT-B-16-tome-100out-linear'"
        )
    base = match["base"]
    cfg = open_clip.get_model_config(base)
    if cfg is None:
        raise DyMUError(
            f"unknown model name {name!r}: {base!r} is not an open_clip model "
            "(see open_clip.list_models())"
        )
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        raise DyMUError(
            f"{base!r} is a timm tower; dymu supports open_clip VisionTransformer towers"
        )
    image, patch = _pair(vision["image_size"]), _pair(vision["patch_size"])
    num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
    keep = int(match["keep"]) if match["keep"] else num_patches // 3
    if not 0 < keep <= num_patches:
        raise DyMUError(f"{name!r} keeps {keep} tokens but {base} has {num_patches} patches")
    schedule = (match["sched"] or "-constant")[1:].replace("-", "_")
    return ModelSpec(name, base, int(vision["layers"]), num_patches, num_patches - keep, schedule)


def _pair(v: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
