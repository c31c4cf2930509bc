"""Adapter for open_clip's ``VisionTransformer`` (OpenAI CLIP, LAION and similar ViTs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from ..errors import DyMUError
from ..patching import call_prior
from .base import Inputs, TowerAdapter, pair, weighted_mean


class OpenCLIPTower(TowerAdapter):
    """An open_clip vision tower built from ``ResidualAttentionBlock``s (class token first)."""

    family = "open_clip VisionTransformer"

    def __init__(self, visual: VisionTransformer) -> None:
        super().__init__()
        if not self.supports(visual):
            raise DyMUError(
                "OpenCLIPTower needs an open_clip VisionTransformer with standard blocks"
            )
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        block = self.blocks[0]
        self.num_blocks = len(self.blocks)
        self.num_heads = block.attn.num_heads
        self.width = block.attn.embed_dim
        self.mlp_width = block.mlp.c_fc.out_features
        self.patch_size = pair(visual.conv1.kernel_size)[0]
        self.num_prefix_tokens = 1  # open_clip always prepends the class embedding
        self.num_tokens = int(visual.positional_embedding.shape[0])
        self.image_size = pair(visual.image_size)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (
            isinstance(module, VisionTransformer)
            and hasattr(module, "_embeds")
            and all(
                type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                for b in module.transformer.resblocks
            )
        )

    @property
    def module(self) -> nn.Module:
        return self.visual

    @property
    def patch_weight(self) -> torch.Tensor:
        return self.visual.conv1.weight

    def embed(self, inputs: Inputs) -> torch.Tensor:
        return self.visual._embeds(inputs)

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self.blocks[block]
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        return qkv.chunk(3, dim=-1)

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls_1(blk.attn.out_proj(out))

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls_2(blk.mlp(blk.ln_2(x)))

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        v = self.visual
        if v.attn_pool is not None or v.pool_type not in ("tok", "avg"):
            return None
        if v.pool_type == "tok":
            pooled = v.ln_post(tokens[:, 0])
        else:  # size-weighted mean over patch tokens: the mean over the original patches
            patches = tokens[:, 1:] if v.final_ln_after_pool else v.ln_post(tokens[:, 1:])
            pooled = weighted_mean(patches, sizes[:, 1:])
            pooled = v.ln_post(pooled) if v.final_ln_after_pool else pooled
        return pooled @ v.proj if v.proj is not None else pooled

    def sized_heads(self, sizes: Callable[[], torch.Tensor | None]) -> list:
        v = self.visual
        if v.attn_pool is not None:
            raise DyMUError("an open_clip tower with an attention pool (CoCa) cannot take sizes")
        if v.pool_type != "avg":
            return []

        def global_pool(visual: nn.Module, x: torch.Tensor):
            current = sizes()
            if current is None:
                return call_prior(visual, "_global_pool", x)
            return weighted_mean(x[:, 1:], current[:, 1:]), x[:, 1:]

        return [(v, "_global_pool", global_pool)]

    def preprocess(self, mean=None, std=None) -> Callable:
        """open_clip's own eval transform for this tower (its ``preprocess_cfg``)."""
        return open_clip_transform(self.visual, mean, std)


def open_clip_transform(visual: nn.Module, mean=None, std=None) -> Callable:
    """The eval transform open_clip would build for ``visual`` (a ViT or a timm tower)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    cfg.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    if "size" not in cfg:
        cfg["size"] = getattr(visual, "image_size", 224)
    return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
