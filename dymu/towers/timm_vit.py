"""Adapter for timm's ``VisionTransformer``, bare or as the trunk of open_clip's ``TimmModel``
(SigLIP and SigLIP2 in open_clip, DeiT, register ViTs, ...)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import DyMUError
from ..patching import call_prior
from .base import HALF, Inputs, TowerAdapter, pair, size_bias, split_heads, weighted_mean

log = logging.getLogger(__name__)

_POOLS = ("map", "token", "avg", "max", "avgmax", "")


def _trunk(module: nn.Module) -> nn.Module | None:
    """The timm ViT itself, or the trunk of an open_clip ``TimmModel`` holding one."""
    if isinstance(module, VisionTransformer):
        return module
    trunk = getattr(module, "trunk", None)
    if type(module).__name__ == "TimmModel" and isinstance(trunk, VisionTransformer):
        return trunk
    return None


class TimmViTTower(TowerAdapter):
    """A timm ``VisionTransformer`` of standard pre-norm ``Block`` s (any prefix tokens)."""

    family = "timm VisionTransformer (bare or in open_clip's TimmModel, e.g. SigLIP)"
    image_mean = HALF
    image_std = HALF
    resize_mode = "squash"

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not self.supports(module):
            raise DyMUError(f"TimmViTTower cannot read a {type(module).__name__}")
        self.tower = module
        self.trunk = _trunk(module)
        trunk = self.trunk
        self.blocks = trunk.blocks
        attn = self.blocks[0].attn
        self.num_blocks = len(self.blocks)
        self.num_heads = attn.num_heads
        self.width = trunk.embed_dim
        self.mlp_width = self.blocks[0].mlp.fc1.out_features
        self.patch_size = pair(trunk.patch_embed.patch_size)[0]
        self.num_prefix_tokens = int(trunk.num_prefix_tokens)
        self.num_tokens = trunk.patch_embed.num_patches + self.num_prefix_tokens
        self.image_size = pair(trunk.patch_embed.img_size)
        self.pool_kind = "map" if trunk.attn_pool is not None else trunk.global_pool
        if self.pool_kind not in _POOLS or (
            self.pool_kind == "map" and not isinstance(trunk.attn_pool, AttentionPoolLatent)
        ):
            log.warning("no pooled output for timm pooling %r: only tokens", self.pool_kind)
            self.pool_kind = None

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        trunk = _trunk(module)
        return trunk is not None and all(
            type(b) is Block
            and type(b.attn) is Attention
            and getattr(b.attn, "gate", None) is None
            and hasattr(b.mlp, "fc1")
            for b in trunk.blocks
        )

    @property
    def module(self) -> nn.Module:
        return self.tower

    @property
    def patch_weight(self) -> torch.Tensor:
        return self.trunk.patch_embed.proj.weight

    def embed(self, inputs: Inputs) -> torch.Tensor:
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(inputs))))

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blk = self.blocks[block]
        attn = blk.attn
        q, k, v = attn.qkv(blk.norm1(x)).chunk(3, dim=-1)
        if not isinstance(attn.q_norm, nn.Identity):  # per-head norms (qk_norm towers)
            q = attn.q_norm(split_heads(q, attn.num_heads)).flatten(-2)
            k = attn.k_norm(split_heads(k, attn.num_heads)).flatten(-2)
        return q, k, v

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls1(blk.attn.proj(blk.attn.norm(out)))

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls2(blk.mlp(blk.norm2(x)))

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        """timm's ``forward_head`` (1.0) on merged tokens: the final norm, then the pool with
        sizes, then the head; inside open_clip's ``TimmModel`` its projection head last."""
        if not self.pool_kind:  # no head, or timm's '' (tokens only)
            return None
        t = self.trunk
        x = self._sized_pool(t.norm(tokens), sizes)
        x = t.head(t.head_drop(t.fc_norm(x)))
        return self.tower.head(x) if self.tower is not t else x

    def _sized_pool(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """timm's ``VisionTransformer.pool`` with sizes: the MAP head with ``log(size)``
        logits, size-weighted means, maxima over real tokens only."""
        t = self.trunk
        prefix = 0 if t.pool_include_prefix else self.num_prefix_tokens
        if self.pool_kind == "map":
            return t.attn_pool(x[:, prefix:], attn_mask=size_bias(sizes[:, prefix:], x.dtype))
        if self.pool_kind == "token":
            return x[:, 0]
        x, real = x[:, prefix:], sizes[:, prefix:] > 0
        mean = weighted_mean(x, sizes[:, prefix:])
        peak = x.masked_fill(~real[..., None], float("-inf")).amax(1)
        return {"avg": mean, "max": peak, "avgmax": 0.5 * (peak + mean)}[self.pool_kind]

    def sized_heads(self, sizes: Callable[[], torch.Tensor | None]) -> list:
        if self.pool_kind in (None, "token"):
            return []

        def pool(trunk: nn.Module, x: torch.Tensor, pool_type: str | None = None):
            current = sizes()
            if current is None or pool_type not in (None, self.pool_kind):
                return call_prior(trunk, "pool", x, pool_type)
            return self._sized_pool(x, current)

        return [(self.trunk, "pool", pool)]

    def preprocess(self, mean=None, std=None) -> Callable:
        if self.tower is not self.trunk:  # open_clip's own transform for its towers
            from .open_clip import open_clip_transform

            return open_clip_transform(self.tower, mean, std)
        return super().preprocess(mean, std)
