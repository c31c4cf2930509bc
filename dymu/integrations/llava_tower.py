"""LLaVA's vision tower, rebuilt on a dymu encoder: the class :func:`dymu.integrations.llava.enable`
has LLaVA build for a dymu tower name.

It keeps the attributes LLaVA reads from its ``CLIPVisionTower`` (``num_patches``,
``image_processor``, ``dummy_feature``, ...) and records each forward's groups for the model's
prompt assembly, which reads them right after in the same call.
"""

from __future__ import annotations

from types import SimpleNamespace

import open_clip
import torch
from torch import nn

from ..encoder.factory import load_encoder
from ..encoder.names import resolve_name
from ..engine.schedule import tome_schedule
from ..errors import DyMUError, MissingThresholds
from ..lm.vtu import expand_groups


class DyMULlavaTower(nn.Module):
    """Stands in for LLaVA's ``CLIPVisionTower``: same attributes, DyMU inside."""

    def __init__(self, name: str, args, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = name
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.pretrained = getattr(args, "dymu_pretrained", "openai")
        self.thresholds = getattr(args, "dymu_thresholds", None)
        self.fixed_r = getattr(args, "dymu_r", None)  # ToMe's r: an int or one per block
        self.direct = bool(getattr(args, "dymu_direct", False))
        self.vtu = bool(getattr(args, "dymu_vtu", True)) and not self.direct
        vision = open_clip.get_model_config(resolve_name(name).base)["vision_cfg"]
        self.cfg_only = SimpleNamespace(
            hidden_size=vision["width"],
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
        )
        # groups and lengths of the last forward, read by the model right after (same call)
        self.last_groups: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tracing = False  # encode_images returns markers instead (see _trace)
        if not delay_load:
            self.load_model()

    def load_model(self, device_map=None) -> None:
        if self.is_loaded:
            return
        from transformers import CLIPImageProcessor

        fixed = {}
        if self.fixed_r is not None and self.thresholds is not None:
            raise DyMUError("a LLaVA config sets dymu_r or dymu_thresholds, not both")
        if self.fixed_r is not None:
            layers = open_clip.get_model_config(resolve_name(self.vision_tower_name).base)
            blocks = layers["vision_cfg"]["layers"]
            fixed = dict(schedule=tome_schedule(self.fixed_r, blocks), fixed_r=True)
        try:
            self.encoder = load_encoder(
                self.vision_tower_name,
                self.pretrained,
                thresholds=self.thresholds,
                select_layer=self.select_layer,
                drop_cls=self.select_feature == "patch",
                **fixed,
            )
        except MissingThresholds as exc:  # advice for a LLaVA config, not for Python
            raise DyMUError(
                exc.advice(
                    'set "dymu_thresholds": FILE in the model\'s config.json',
                    '"dymu_r" merges a fixed number per block instead',
                )
            ) from None
        size = self.cfg_only.image_size
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(open_clip.OPENAI_DATASET_MEAN),
            image_std=list(open_clip.OPENAI_DATASET_STD),
        )
        self.is_loaded = True

    @torch.no_grad()
    def forward(self, images: torch.Tensor | list[torch.Tensor]):
        """``(B, P, D)`` features repeated per group, or (direct) a list of merged ``(L_i, D)``."""
        if isinstance(images, list):
            images = torch.stack([i if i.dim() == 3 else i[0] for i in images])
        out = self.encoder(images.to(device=self.device, dtype=self.dtype))
        self.last_groups = (out.groups, out.lengths)
        if self.direct:
            return [t.to(images.dtype) for t in out.to_list()]
        return expand_groups(out.tokens, out.groups).to(images.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def config(self) -> SimpleNamespace:
        return self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.cfg_only.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.cfg_only.image_size // self.cfg_only.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)
