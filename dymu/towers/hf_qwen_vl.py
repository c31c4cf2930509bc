"""Adapter for the vision towers of transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL.

These towers differ from the ViTs the other adapters read (``towers.base``): every image is
a flat run of patches (``pixel_values (T, C * t * p * p)`` with ``grid_thw``), 2D rotary
position embeddings rotate q/k in every block, Qwen2.5-VL attends inside 112-pixel windows in
all blocks but a few, and a patch merger turns each 2x2 *unit* of neighbouring patches into
one LLM token. Qwen3-VL adds learned position embeddings (resampled to each image's grid) and
DeepStack: extra patch mergers read the hidden states of a few blocks and feed early LLM
layers. So the adapter hands out units, windows and the rotary tables beside the usual
``qkv`` / ``attn_out`` / ``mlp`` seam, and the feature heads of those blocks;
:class:`dymu.encoder.qwen.QwenDyMUEncoder` merges whole units inside windows (see there why).

The embedding mirrors the first lines of the towers' forwards in transformers 5.18-5.25
(``get_vision_position_ids``, ``get_vision_window_index``, the tower's own patch embedding
and rotary module); a test compares the unmerged encoder with the tower's own forward.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DyMUError

log = logging.getLogger(__name__)

CLASSES = (
    "Qwen2VisionTransformerPretrainedModel",
    "Qwen2_5_VisionTransformerPretrainedModel",
    "Qwen3VLVisionModel",
)
# Qwen2.5-VL's window, 4x4 units (112 px at 14 px patches); Qwen2-VL and Qwen3-VL have no
# windows, and dymu merges inside windows of 4x4 units there too, so a schedule (merges per
# window) means the same thing in every family
WINDOW_UNITS = 4


@dataclass
class Embedded:
    """A batch's patch embeddings in window order, with what the block loop needs.

    ``x (P, D)`` patches, the ``unit`` patches of each 2x2 unit contiguous, units grouped by
    window; ``rope (P, 2 * head_dim)`` float32 (``cos | sin`` of every patch);
    ``window_units``: units per window (host); ``window_frame``: the frame (image, or
    temporal patch of a video) each window lies in; ``frame_units``: units per frame;
    ``window_index (U,)``: the raster unit each window-order unit is (the tower's own order).
    """

    x: torch.Tensor
    rope: torch.Tensor
    window_units: list[int]
    window_frame: np.ndarray
    frame_units: list[int]
    window_index: torch.Tensor


class QwenPreprocess:
    """A Qwen-VL image processor as a per-image transform: ``{pixel_values (P, F),
    image_grid_thw (1, 3)}`` (a class, so DataLoader workers can receive it)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> dict[str, torch.Tensor]:
        out = self.processor(images=[image], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    @property
    def mean(self) -> tuple[float, ...]:
        """The processor's normalisation (pictures of merged groups undo it)."""
        return tuple(self.processor.image_mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.processor.image_std)


class QwenVisionTower(nn.Module):
    """A transformers Qwen2-VL or Qwen2.5-VL vision tower seen block by block."""

    family = "transformers Qwen2-VL / Qwen2.5-VL vision towers"

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not self.supports(tower):
            raise DyMUError(f"{type(self).__name__} cannot read a {type(tower).__name__}")
        self.tower = tower
        self.blocks = tower.blocks
        config = tower.config
        self.num_blocks = len(self.blocks)
        self.num_heads = int(config.num_heads)
        self.width = self.blocks[0].attn.proj.in_features
        self.head_dim = self.width // self.num_heads
        mlp = self.blocks[0].mlp
        first = getattr(mlp, "fc1", None) or getattr(mlp, "gate_proj", None)
        self.mlp_width = first.out_features if first is not None else 4 * self.width
        self.patch_size = int(config.patch_size)
        self.merge_size = int(config.spatial_merge_size)
        self.unit = self.merge_size**2
        merger = tower.merger
        last = getattr(merger, "linear_fc2", None) or merger.mlp[-1]
        self.out_width = int(last.out_features)
        # Qwen3-VL's DeepStack: blocks whose hidden states also go through a patch merger
        self.feature_blocks = [int(b) for b in getattr(config, "deepstack_visual_indexes", ())]
        default = WINDOW_UNITS * self.merge_size * self.patch_size  # pixels
        self.window_size = int(getattr(config, "window_size", None) or default)
        full = getattr(config, "fullatt_block_indexes", None)
        # blocks that attend inside windows (Qwen2.5-VL); the rest attend over a whole frame
        self.windowed = [full is not None and b not in full for b in range(self.num_blocks)]
        self._rotate = sys.modules[type(tower).__module__].apply_rotary_pos_emb_vision
        self.num_prefix_tokens = 0
        # the budget's unit: units per (full) window; images have as many windows as their
        # resolution gives, so there is no fixed token count per image (0 says so)
        self.window_units = (self.window_size // self.merge_size // self.patch_size) ** 2
        self.num_tokens = 0

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return type(module).__name__ in CLASSES and type(module).__module__.startswith(
            "transformers."
        )

    @property
    def module(self) -> nn.Module:
        return self.tower

    @property
    def patch_weight(self) -> torch.Tensor:
        return self.tower.patch_embed.proj.weight

    def architecture(self) -> str:
        """Family-neutral shape, as threshold files record it."""
        return (
            f"{self.num_blocks} blocks, width {self.width}, {self.num_heads} heads, "
            f"patches of {self.patch_size}px in {self.merge_size}x{self.merge_size} units, "
            f"windows of {self.window_size}px"
        )

    def preprocess(self, folder: str | None = None) -> QwenPreprocess:
        """PIL image -> the model's processor output at its dynamic resolution: the folder's
        own image processor, or (no folder) the family's with this tower's patch sizes."""
        from transformers import AutoImageProcessor, Qwen2VLImageProcessor

        if folder is not None:
            try:
                return QwenPreprocess(
                    AutoImageProcessor.from_pretrained(folder, local_files_only=True)
                )
            except OSError:
                log.warning("%s has no image processor config; using Qwen2-VL's defaults", folder)
        config = self.tower.config
        return QwenPreprocess(
            Qwen2VLImageProcessor(
                patch_size=self.patch_size,
                merge_size=self.merge_size,
                temporal_patch_size=int(config.temporal_patch_size),
            )
        )

    def embed(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Embedded:
        """Patch embeddings and rotary tables in window order (the tower's own modules)."""
        try:
            from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
        except ImportError as err:  # before transformers 5.18
            raise DyMUError("dymu's Qwen-VL support needs transformers >= 5.18") from err
        tower = self.tower
        grid = grid_thw.cpu()
        t, h, w = grid.numpy().T
        x = self._patch_embed(pixel_values)
        if getattr(tower, "pos_embed", None) is not None:  # Qwen3-VL: learned, resampled
            x = x + self._learned_positions(grid).to(x.device, x.dtype)
        positions = get_vision_position_ids(grid, self.merge_size).to(x.device)
        cos, sin = tower.rotary_pos_emb(x, positions)
        window_index, bounds = get_vision_window_index(
            grid, self.merge_size, self.window_size, self.patch_size
        )
        window_index = window_index.to(x.device)
        rope = torch.cat([cos, sin], -1).float()
        x, rope = (self._window_order(t, window_index) for t in (x, rope))
        window_units = (np.diff(bounds.numpy()) // self.unit).tolist()
        frame_units = np.repeat(h * w, t) // self.unit
        frame_ends = np.cumsum(frame_units)
        window_frame = np.searchsorted(frame_ends, np.cumsum(window_units), side="left")
        return Embedded(x, rope, window_units, window_frame, frame_units.tolist(), window_index)

    def _patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's patch embedding as one matrix product. Its ``PatchEmbed`` (Qwen2-VL,
        Qwen2.5-VL and Qwen3-VL alike, transformers 5.18-5.25) views each row as one whole
        patch and applies a ``Conv3d`` whose kernel is its stride: a linear map of the row,
        which a GEMM computes faster than the Conv3d path on a CPU (about 6 ms against 14
        at 1444 patches, one thread). Any other embedding runs as it is."""
        embed = self.tower.patch_embed
        proj = getattr(embed, "proj", None)
        plain = (
            isinstance(proj, nn.Conv3d)
            and proj.kernel_size == proj.stride
            and proj.padding == (0, 0, 0)
            and proj.groups == 1
            and pixel_values.shape[-1] == proj.weight[0].numel()
        )
        if not plain:
            return embed(pixel_values.to(next(embed.parameters()).dtype))
        weight = proj.weight.flatten(1)  # (out, C * T * P * P): the row's own order
        return F.linear(pixel_values.to(weight.dtype), weight, proj.bias)

    def _learned_positions(self, grid: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL's learned position table resampled to every patch (unit order), as its
        forward does (transformers 5.18-5.25)."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        tower = self.tower
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=tower.num_grid_per_side,
            mode=tower.interpolation_mode,
            align_corners=tower.interpolation_align_corners,
            spatial_merge_size=self.merge_size,
        )
        device = tower.pos_embed.weight.device
        table = tower.pos_embed(indices.to(device))
        return (table * weights.to(device, table.dtype)[:, :, None]).sum(1)

    def _window_order(self, t: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Patch rows regrouped by unit into window order (the tower's own permutation)."""
        rows = t.reshape(-1, self.unit, t.shape[-1])
        return rows.index_select(0, window_index).reshape(t.shape)

    def patch_grid(self, inputs, index: int) -> tuple[int, int]:
        """Unit rows and columns of image ``index`` of a processor batch (pictures of merged
        groups are drawn per 2x2 unit: a unit is what merges)."""
        _, h, w = inputs["image_grid_thw"][index].tolist()
        return h // self.merge_size, w // self.merge_size

    def image_tensor(self, inputs, index: int) -> torch.Tensor:
        """Image ``index`` as normalised ``(3, H, W)`` pixels, put back together from the
        processor's flat patches (unit by unit, the first temporal slice)."""
        grid = inputs["image_grid_thw"]
        first = int(grid[:index].prod(-1).sum())
        t, h, w = grid[index].tolist()
        m, p = self.merge_size, self.patch_size
        rows = inputs["pixel_values"][first : first + h * w].float().cpu()
        patches = rows.view(h // m, w // m, m, m, 3, -1, p, p)[:, :, :, :, :, 0]
        return patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, h * p, w * p)

    def qkv(self, block: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-norm and in-projection: q, k, v each ``(P, D)``, before the rotation."""
        layer = self.blocks[block]
        return layer.attn.qkv(layer.norm1(x)).chunk(3, dim=-1)

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k ``(P, D)`` rotated by every patch's ``cos | sin`` (the family's function)."""
        cos, sin = rope.chunk(2, dim=-1)
        shape = (q.shape[0], self.num_heads, self.head_dim)
        q, k = self._rotate(q.view(shape), k.view(shape), cos, sin)
        return q.reshape(-1, self.width), k.reshape(-1, self.width)

    def attn_out(self, block: int, out: torch.Tensor) -> torch.Tensor:
        return self.blocks[block].attn.proj(out)

    def mlp(self, block: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.blocks[block]
        return layer.mlp(layer.norm2(x))

    def merger(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's 2x2 patch merger: ``(U * unit, D)`` patches -> ``(U, out)`` tokens."""
        return self.tower.merger(x)

    def feature_head(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """The DeepStack merger reading block ``block``'s output: ``(U, out)`` tokens."""
        return self.tower.deepstack_merger_list[self.feature_blocks.index(block)](x)
