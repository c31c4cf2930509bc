"""Adapter for transformers' CLIP vision tower (``CLIPVisionModel``, as in llava-1.5-hf), and
the encoder layers CLIP and SigLIP share."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from ..errors import DyMUError
from .base import Inputs, TowerAdapter, pair


class HFEncoderLayers(TowerAdapter):
    """Towers whose layers are ``layer_norm1 -> self_attn (q/k/v/out_proj) -> layer_norm2 ->
    mlp`` (transformers' CLIP, SigLIP and SigLIP2) under ``encoder.layers``."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not self.supports(tower):
            raise DyMUError(f"{type(self).__name__} cannot read a {type(tower).__name__}")
        self.tower = tower
        # transformers 5 puts the modules on the model; older versions under ``vision_model``
        self.core = getattr(tower, "vision_model", tower)
        self.blocks = self.core.encoder.layers
        config = tower.config
        self.num_blocks = len(self.blocks)
        self.num_heads = config.num_attention_heads
        self.width = config.hidden_size
        self.mlp_width = config.intermediate_size
        self.patch_size = int(config.patch_size)
        self.image_size = pair(getattr(config, "image_size", 0))

    @property
    def module(self) -> nn.Module:
        return self.tower

    @property
    def patch_weight(self) -> torch.Tensor:
        return self.core.embeddings.patch_embedding.weight

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


class HFCLIPTower(HFEncoderLayers):
    """A transformers ``CLIPVisionModel``: class token, pre-norm, class-token head."""

    family = "transformers CLIPVisionModel"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__(tower)
        self.num_prefix_tokens = 1
        self.num_tokens = int(self.core.embeddings.num_positions)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, CLIPVisionModel)

    def embed(self, inputs: Inputs) -> torch.Tensor:
        return self.core.pre_layrnorm(self.core.embeddings(inputs))

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        return self.core.post_layernorm(tokens[:, 0])
