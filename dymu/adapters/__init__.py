"""Vision-tower adapters: how to read embeddings, q/k/v, MLPs and the head of one tower family."""

from __future__ import annotations

from torch import nn

from ..errors import DyMUError
from .base import TowerAdapter
from .hf_clip import HFCLIPTower
from .open_clip import OpenCLIPTower

__all__ = ["HFCLIPTower", "OpenCLIPTower", "TowerAdapter", "adapt"]


def adapt(tower: nn.Module) -> TowerAdapter:
    """Pick the adapter for a vision tower instance."""
    if OpenCLIPTower.supports(tower):
        return OpenCLIPTower(tower)
    if HFCLIPTower.supports(tower):
        return HFCLIPTower(tower)
    raise DyMUError(
        f"no dymu adapter for {type(tower).__module__}.{type(tower).__name__}; supported: "
        "open_clip VisionTransformer (standard blocks) and transformers CLIPVisionModel"
    )
