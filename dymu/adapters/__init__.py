"""Vision-tower adapters: how to read embeddings, q/k/v, MLPs and the head of one tower family."""

from __future__ import annotations

from torch import nn

from ..errors import DyMUError
from .base import TowerAdapter
from .open_clip import OpenCLIPTower

__all__ = ["TowerAdapter", "OpenCLIPTower", "adapt"]


def adapt(tower: nn.Module) -> TowerAdapter:
    """Pick the adapter for a vision tower instance."""
    if OpenCLIPTower.supports(tower):
        return OpenCLIPTower(tower)
    raise DyMUError(
        f"no dymu adapter for {type(tower).__module__}.{type(tower).__name__}; supported: "
        "open_clip VisionTransformer with standard residual attention blocks"
    )
