"""Adapter for transformers' CLIP vision tower (``CLIPVisionModel``, as in llava-1.5-hf)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DyMUError
from .base import TowerAdapter


class HFCLIPTower(TowerAdapter):
    """A transformers ``CLIPVisionModel`` (or its ``vision_model``) read block by block."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not self.supports(tower):
            raise DyMUError(f"HFCLIPTower needs a transformers CLIPVisionModel, not {type(tower)}")
        self.tower = tower
        self.core = getattr(tower, "vision_model", tower)
        self.blocks = self.core.encoder.layers
        self.num_blocks = len(self.blocks)
        self.num_heads = self.blocks[0].self_attn.num_heads
        self.has_cls = True
        self.num_tokens = int(self.core.embeddings.num_positions)

    @staticmethod
    def supports(tower: object) -> bool:
        core = getattr(tower, "vision_model", tower)
        return all(hasattr(core, n) for n in ("embeddings", "pre_layrnorm", "encoder")) and all(
            hasattr(layer, "layer_norm1") and hasattr(layer.self_attn, "q_proj")
            for layer in getattr(core.encoder, "layers", [None])
        )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.core.pre_layrnorm(self.core.embeddings(pixel_values))

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.blocks[block]
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        return self.blocks[block].self_attn.out_proj(out)

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.mlp(layer.layer_norm2(x))

    def pool(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        return self.core.post_layernorm(x[:, 0])
