"""Adapter for transformers' ``Dinov2Model`` and ``Dinov2WithRegistersModel``.

Mirrors transformers 5.23-5.25's ``Dinov2Layer`` (and its register twin, the same layer):
``norm1 -> attention (q/k/v/o_proj) -> layer_scale1 -> drop_path``, then
``norm2 -> mlp (Dinov2MLP or SwiGLU) -> layer_scale2 -> drop_path``, under ``encoder.layer``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Dinov2Model, Dinov2WithRegistersModel

from ..errors import DyMUError
from .base import pair
from .hf_vit import HFViTLayers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Tower(HFViTLayers):
    """A transformers DINOv2 model: class token (then registers, if any), final layernorm,
    class-token pooling."""

    family = "transformers Dinov2Model, Dinov2WithRegistersModel"
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD
    pre_norm = "norm1"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not self.supports(tower):
            raise DyMUError(f"Dinov2Tower cannot read a {type(tower).__name__}")
        self.tower = tower
        self.blocks = tower.encoder.layer
        config = tower.config
        mlp = self.blocks[0].mlp
        self.num_blocks = len(self.blocks)
        self.num_heads = config.num_attention_heads
        self.width = config.hidden_size
        self.mlp_width = (mlp.gate_proj if hasattr(mlp, "gate_proj") else mlp.fc1).out_features
        self.patch_size = pair(config.patch_size)[0]
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)
        patches = tower.embeddings.patch_embeddings.num_patches
        self.num_tokens = patches + self.num_prefix_tokens
        self.image_size = pair(config.image_size)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, (Dinov2Model, Dinov2WithRegistersModel))

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.drop_path(layer.layer_scale1(layer.attention.o_proj(out)))

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        return self.tower.layernorm(tokens[:, 0])
