"""Adapter for transformers' ``ViTModel`` (Google ViT, DeiT checkpoints in ViT form, ...)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import ViTModel

from ..errors import DyMUError
from .base import HALF, Inputs, TowerAdapter, pair


class HFViTLayers(TowerAdapter):
    """Towers with ViT's embeddings (``embeddings.patch_embeddings.projection``) and layers
    whose attention has q/k/v projections after a pre-norm named ``pre_norm``: transformers'
    ViT and DINOv2."""

    pre_norm: str  # the layer's norm before attention

    @property
    def module(self) -> nn.Module:
        return self.tower

    @property
    def patch_weight(self) -> torch.Tensor:
        return self.tower.embeddings.patch_embeddings.projection.weight

    def embed(self, inputs: Inputs) -> torch.Tensor:
        return self.tower.embeddings(inputs)

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = self.blocks[block]
        h = getattr(layer, self.pre_norm)(x)
        attn = layer.attention
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)


class HFViTTower(HFViTLayers):
    """A transformers ``ViTModel`` (transformers 5 layout: ``layers``, q/k/v/o projections)."""

    family = "transformers ViTModel"
    image_mean = HALF
    image_std = HALF
    resize_mode = "squash"
    interpolation = "bilinear"
    pre_norm = "layernorm_before"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not self.supports(tower):
            raise DyMUError(f"HFViTTower cannot read a {type(tower).__name__}")
        self.tower = tower
        self.blocks = tower.layers
        config = tower.config
        self.num_blocks = len(self.blocks)
        self.num_heads = config.num_attention_heads
        self.width = config.hidden_size
        self.mlp_width = config.intermediate_size
        self.patch_size = int(pair(config.patch_size)[0])
        self.num_prefix_tokens = 1
        self.num_tokens = tower.embeddings.patch_embeddings.num_patches + 1
        self.image_size = pair(config.image_size)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, ViTModel) and hasattr(module, "layers")

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.dropout(layer.attention.o_proj(out))

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.dropout(layer.mlp(layer.layernorm_after(x)))

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        if self.tower.pooler is None:
            return None
        return self.tower.pooler(self.tower.layernorm(tokens[:, :1]))
