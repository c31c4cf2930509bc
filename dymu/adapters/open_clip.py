"""Adapter for open_clip's ``VisionTransformer`` (OpenAI CLIP, LAION and similar ViTs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from ..errors import DyMUError
from .base import TowerAdapter


class OpenCLIPTower(TowerAdapter):
    """An open_clip vision tower built from ``ResidualAttentionBlock``s."""

    def __init__(self, visual: VisionTransformer) -> None:
        super().__init__()
        if not self.supports(visual):
            raise DyMUError(
                "OpenCLIPTower needs an open_clip VisionTransformer with standard blocks"
            )
        self.visual = visual
        self.blocks = visual.transformer.resblocks
        self.num_blocks = len(self.blocks)
        self.num_heads = self.blocks[0].attn.num_heads
        self.has_cls = True  # open_clip always prepends the class embedding
        self.num_tokens = int(visual.positional_embedding.shape[0])

    @staticmethod
    def supports(tower: object) -> bool:
        return (
            isinstance(tower, VisionTransformer)
            and hasattr(tower, "_embeds")
            and all(
                type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                for b in tower.transformer.resblocks
            )
        )

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual._embeds(pixel_values)

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

    def pool(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        v = self.visual
        if v.attn_pool is not None or v.pool_type not in ("tok", "avg"):
            return None
        if v.pool_type == "tok":
            pooled = v.ln_post(x[:, 0])
        else:  # size-weighted mean over patch tokens: the mean over the original patches
            weights = (sizes[:, 1:] / sizes[:, 1:].sum(-1, keepdim=True)).to(x.dtype)
            tokens = x[:, 1:] if v.final_ln_after_pool else v.ln_post(x[:, 1:])
            pooled = (tokens * weights[..., None]).sum(1)
            pooled = v.ln_post(pooled) if v.final_ln_after_pool else pooled
        return pooled @ v.proj if v.proj is not None else pooled
