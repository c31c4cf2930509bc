"""The interface the encoder's block loop needs from a vision tower."""

from __future__ import annotations

import torch
from torch import nn


class TowerAdapter(nn.Module):
    """Reads a tower's own modules (no copies): a pre-norm ViT seen block by block.

    Subclasses hold the tower as a submodule, so ``.to()``/``.half()`` and ``state_dict``
    act on the original weights.
    """

    num_blocks: int
    num_heads: int
    has_cls: bool
    num_tokens: int  # tokens entering the first block (class token included)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + class + position embeddings (and pre-norm): ``(B, N0, D)``."""
        raise NotImplementedError

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm and in-projection of ``x``: q, k, v each ``(B, N, D)``, bias included."""
        raise NotImplementedError

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        """Output projection (and layer scale) of the attention result ``(B, N, D)``."""
        raise NotImplementedError

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch of the block (norm, MLP, layer scale), without the residual."""
        raise NotImplementedError

    def pool(self, x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        """The tower's image embedding from its final tokens; ``None`` if it has no head."""
        raise NotImplementedError
