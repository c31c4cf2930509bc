"""Adapters for transformers' ``SiglipVisionModel`` (LLaVA-OneVision's tower) and
``Siglip2VisionModel`` (variable patch counts per image, as a padded batch)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from transformers import Siglip2VisionModel, SiglipVisionModel

from ..errors import DyMUError
from ..patching import call_prior
from .base import HALF, Inputs, size_bias
from .hf_clip import HFEncoderLayers


def map_head(head: nn.Module, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """SigLIP's attention-pool head on merged, padded tokens.

    Mirrors ``SiglipMultiheadAttentionPoolingHead.forward`` of transformers 5.23-5.25 (the SigLIP2
    head is the same) with one change: the probe's logits get ``log(size)`` of every key and
    -inf on padding, so with nothing merged it is the unmodified head.
    """
    bsz, length = tokens.shape[:2]
    heads = head.attention.num_heads
    probe = head.probe.repeat(bsz, 1, 1)
    bias = size_bias(sizes, tokens.dtype).expand(bsz, heads, 1, length)
    out = head.attention(
        probe, tokens, tokens, attn_mask=bias.reshape(bsz * heads, 1, length), need_weights=False
    )[0]
    out = out + head.mlp(head.layernorm(out))
    return out[:, 0]


class HFSiglipTower(HFEncoderLayers):
    """A transformers ``SiglipVisionModel``: no prefix tokens, attention-pool head."""

    family = "transformers SiglipVisionModel"
    image_mean = HALF
    image_std = HALF
    resize_mode = "squash"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__(tower)
        self.num_prefix_tokens = 0
        self.num_tokens = int(self.core.embeddings.num_patches)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, SiglipVisionModel)

    def embed(self, inputs: Inputs) -> torch.Tensor:
        return self.core.embeddings(inputs)

    def pool(self, tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor | None:
        if not getattr(self.core, "use_head", False):
            return None
        return map_head(self.core.head, self.core.post_layernorm(tokens), sizes)

    def sized_heads(self, sizes: Callable[[], torch.Tensor | None]) -> list:
        if not getattr(self.core, "use_head", False):
            return []

        def forward(head: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
            current = sizes()
            if current is None:
                return call_prior(head, "forward", hidden_state)
            return map_head(head, hidden_state, current)

        return [(self.core.head, "forward", forward)]


class HFSiglip2Tower(HFSiglipTower):
    """A transformers ``Siglip2VisionModel``. Its input is the processor's dict: patches
    ``pixel_values (B, N, 3*p*p)``, ``pixel_attention_mask (B, N)`` and ``spatial_shapes
    (B, 2)``; each image has its own patch grid, padded to ``N`` (padding is never a token)."""

    family = "transformers Siglip2VisionModel"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return isinstance(module, Siglip2VisionModel)

    def embed(self, inputs: Inputs) -> torch.Tensor:
        inputs = _siglip2_inputs(inputs)
        return self.core.embeddings(inputs["pixel_values"], inputs["spatial_shapes"])

    def input_lengths(self, inputs: Inputs) -> torch.Tensor:
        mask = _siglip2_inputs(inputs)["pixel_attention_mask"].long()
        lengths = mask.sum(1)
        # the processor pads at the end; anything else would put padding among the tokens
        if not bool((mask.cumprod(1).sum(1) == lengths).all()):
            raise DyMUError("pixel_attention_mask must mark each image's patches first")
        return lengths

    def sized_heads(self, sizes: Callable[[], torch.Tensor | None]) -> list:
        raise DyMUError(
            "apply_tome cannot patch a Siglip2VisionModel (its inputs are padded patch "
            "sequences); use dymu.load_encoder for it"
        )

    def patch_grid(self, inputs: Inputs, index: int) -> tuple[int, int]:
        rows, cols = _siglip2_inputs(inputs)["spatial_shapes"][index].tolist()
        return int(rows), int(cols)

    def image_tensor(self, inputs: Inputs, index: int) -> torch.Tensor:
        """Patches back into an image: the processor flattens each patch as ``(p, p, C)``."""
        rows, cols = self.patch_grid(inputs, index)
        p = self.patch_size
        patches = _siglip2_inputs(inputs)["pixel_values"][index, : rows * cols]
        grid = patches.reshape(rows, cols, p, p, -1).permute(4, 0, 2, 1, 3)
        return grid.reshape(-1, rows * p, cols * p)

    def preprocess(self, mean=None, std=None) -> Callable:
        from transformers import Siglip2ImageProcessor

        processor = Siglip2ImageProcessor(
            patch_size=self.patch_size,
            max_num_patches=self.num_tokens,
            image_mean=list(mean or self.image_mean),
            image_std=list(std or self.image_std),
        )
        return ProcessorTransform(processor)


class ProcessorTransform:
    """A transformers image processor as a one-image transform: PIL image -> dict of tensors
    without the batch dimension (so a DataLoader's items stack into a batch)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.mean, self.std = processor.image_mean, processor.image_std

    def __call__(self, image) -> dict[str, torch.Tensor]:
        out = self.processor(images=image.convert("RGB"), return_tensors="pt")
        return {key: value[0] for key, value in out.items()}


_SIGLIP2_KEYS = {"pixel_values", "pixel_attention_mask", "spatial_shapes"}


def _siglip2_inputs(inputs: Inputs) -> Mapping[str, torch.Tensor]:
    if not isinstance(inputs, Mapping) or not _SIGLIP2_KEYS <= set(inputs):
        raise DyMUError(
            "a Siglip2VisionModel takes its processor's dict (pixel_values, "
            "pixel_attention_mask, spatial_shapes), not a pixel tensor"
        )
    return inputs
