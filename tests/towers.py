"""Tiny towers of every family dymu adapts, built from configs with seeded random weights.

timm models are registered here (``vit_dymu_test_siglip``: SigLIP-shaped, no class token,
attention-pool head; ``vit_dymu_test_reg4``: a class token and 4 registers, mean pooling), so
open_clip's ``ViT-T-8-SigLIP-test`` config (``tests/configs``) can name its trunk.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

SIZE, PATCH, WIDTH, DEPTH, HEADS = 64, 8, 32, 4, 4
SIGLIP_NAME = "ViT-T-8-SigLIP-test"

_VIT = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
_FACTORY_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm passes these


def _vit(args: dict, kwargs: dict) -> VisionTransformer:
    kwargs = {k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY}
    return VisionTransformer(**{**args, **kwargs})


@register_model
def vit_dymu_test_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit(dict(_VIT, class_token=False, global_pool="map", act_layer="gelu_tanh"), kwargs)


@register_model
def vit_dymu_test_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(_VIT, reg_tokens=4, no_embed_class=True, global_pool="avg", num_classes=10)
    return _vit(args, kwargs)


def hf_shape() -> dict:
    """The tiny transformer shape every transformers tower here shares."""
    return dict(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        patch_size=PATCH,
    )


def hf_clip() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(image_size=SIZE, **hf_shape()))


def hf_siglip() -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(image_size=SIZE, **hf_shape()))


def hf_siglip2() -> nn.Module:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    return Siglip2VisionModel(Siglip2VisionConfig(num_patches=64, **hf_shape()))


def hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=SIZE, **hf_shape()))


def _dinov2_config(config_cls: type, **extra):
    """A tiny DINOv2 config: ``mlp_ratio`` instead of ``intermediate_size``, layer scale not 1."""
    shape = {k: v for k, v in hf_shape().items() if k != "intermediate_size"}
    return config_cls(image_size=SIZE, mlp_ratio=2, layerscale_value=0.5, **shape, **extra)


def hf_dinov2() -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(_dinov2_config(Dinov2Config))


def hf_dinov2_reg() -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = _dinov2_config(Dinov2WithRegistersConfig, num_register_tokens=4, use_swiglu_ffn=True)
    return Dinov2WithRegistersModel(config)


def open_clip_siglip() -> nn.Module:
    import open_clip

    return open_clip.create_model(SIGLIP_NAME, pretrained=None).visual  # a TimmModel


def timm_reg4() -> nn.Module:
    import timm

    return timm.create_model("vit_dymu_test_reg4")


BUILDERS = {
    "open_clip SigLIP": open_clip_siglip,
    "timm reg4": timm_reg4,
    "hf CLIP": hf_clip,
    "hf SigLIP": hf_siglip,
    "hf SigLIP2": hf_siglip2,
    "hf ViT": hf_vit,
    "hf DINOv2": hf_dinov2,
    "hf DINOv2 reg4": hf_dinov2_reg,
}


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[kind]().eval()
