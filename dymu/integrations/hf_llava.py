"""DyMU in transformers' ``LlavaForConditionalGeneration`` (the llava-1.5-hf layout).

``apply(model, thresholds=...)`` patches the instance: the vision path becomes the DyMU
encoder over the model's own CLIP weights (LLaVA's feature layer and class-token
handling), the projector runs on the merged tokens, and each merged feature is repeated
over the patches of its group so the prompt keeps its full image-token layout. With
``vtu=True`` the language model runs virtual token unmerging: hidden states at merged
length, attention at the full positions. ``model.generate(**processor(...))`` works
unchanged; ``remove(model)`` restores the original model.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import adapt
from ..encoder import DyMUEncoder
from ..errors import DyMUError
from ..schedule import make_schedule
from ..thresholds import Thresholds
from ..vtu import apply_vtu, expand_groups, remove_vtu

_STATE = "_dymu_llava"


@dataclass
class _State:
    encoder: DyMUEncoder
    vtu: bool


def build_encoder(
    model: nn.Module,
    thresholds: str | os.PathLike | Thresholds | None = None,
    r_total: int = 0,
    schedule: str | list[int] = "constant",
) -> DyMUEncoder:
    """The DyMU encoder over a LLaVA model's CLIP tower (also what calibration runs on).

    With ``thresholds``, their per-block ``r`` is the schedule; without, ``r_total`` and
    ``schedule`` give one (for :func:`dymu.find_thresholds`).
    """
    llava = _llava_model(model)
    layer = llava.config.vision_feature_layer
    if not isinstance(layer, int):
        raise DyMUError(f"dymu supports one vision feature layer, this model uses {layer}")
    tower = adapt(llava.vision_tower)
    drop_cls = llava.config.vision_feature_select_strategy == "default"
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.load(thresholds)
    if thresholds is not None:
        r, name = thresholds.r.tolist(), thresholds.metadata.get("model", "hf-clip-tome")
    else:
        r, name = make_schedule(r_total, tower.num_blocks, schedule), "hf-clip-tome"
    encoder = DyMUEncoder(tower, r, select_layer=layer, drop_cls=drop_cls, name=name)
    if thresholds is not None:
        encoder.set_thresholds(thresholds)
    return encoder.eval()


def apply(
    model: nn.Module, thresholds: str | os.PathLike | Thresholds, vtu: bool = True
) -> nn.Module:
    """Patch a ``LlavaForConditionalGeneration`` (or ``LlavaModel``) in place; idempotent."""
    llava = _llava_model(model)
    if _STATE in llava.__dict__:
        return model
    encoder = build_encoder(model, thresholds)
    # kept out of the module tree: the encoder reads the tower's own parameters
    llava.__dict__[_STATE] = _State(encoder, vtu)
    llava.forward = types.MethodType(_forward, llava)
    if vtu:
        apply_vtu(llava.language_model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`."""
    llava = _llava_model(model)
    state = llava.__dict__.pop(_STATE, None)
    llava.__dict__.pop("forward", None)
    if state is not None and state.vtu:
        remove_vtu(llava.language_model)
    return model


def build_mapping(
    is_image: torch.Tensor, groups: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """Full position -> merged slot for a batch of prompts.

    ``is_image (B, N)`` marks image placeholders (``P`` per image, images in row-major
    order), ``groups (I, P)`` the slot of each patch within its image, ``lengths (I,)``
    each image's merged count. Text tokens get a slot each; image ``k`` takes ``lengths[k]``
    slots after the text before it.
    """
    num_images, per_image = groups.shape
    found = int(is_image.sum())
    if found != num_images * per_image:
        raise DyMUError(
            f"the prompts hold {found} image tokens but {num_images} images need "
            f"{num_images * per_image} ({per_image} each)"
        )
    order = is_image.long().cumsum(1) - 1
    last = is_image & (order % per_image == per_image - 1)
    step = (~is_image).long()
    step[last] = lengths.to(step.device)
    base = step.cumsum(1) - step
    within = torch.zeros_like(step)
    within[is_image] = groups.reshape(-1).to(step.device)
    return base + within


def _forward(self: nn.Module, *args, pixel_values=None, input_ids=None, **kwargs):
    """LlavaModel.forward with the DyMU vision path (and the VTU mapping) in front."""
    state: _State = self.__dict__[_STATE]
    if pixel_values is None or kwargs.get("mm_encoder_outputs") is not None:
        return type(self).forward(
            self, *args, input_ids=input_ids, pixel_values=pixel_values, **kwargs
        )
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    _check_feature_choice(state.encoder, kwargs)
    param = next(state.encoder.parameters())
    out = state.encoder(pixel_values.to(device=param.device, dtype=param.dtype))
    merged = self.multi_modal_projector(out.tokens)  # (I, L, D_text): projector at merged length
    features = expand_groups(merged, out.groups)  # each patch gets its group's feature
    kwargs["mm_encoder_outputs"] = {
        "image": BaseModelOutputWithPooling(pooler_output=list(features))
    }
    if state.vtu:
        if input_ids is None:
            raise DyMUError("DyMU with VTU needs input_ids to find the image tokens")
        is_image = input_ids == self.config.image_token_id
        kwargs["vtu_mapping"] = build_mapping(is_image, out.groups, out.lengths)
    return type(self).forward(self, *args, input_ids=input_ids, **kwargs)


def _check_feature_choice(encoder: DyMUEncoder, kwargs: dict) -> None:
    """Per-call feature layer/strategy: fine when they match the patched encoder, else an error
    (the encoder was built for the config's choice; silently ignoring one would mislead)."""
    layer = kwargs.pop("vision_feature_layer", None)
    strategy = kwargs.pop("vision_feature_select_strategy", None)
    if layer is not None and layer != encoder.select_layer:
        raise DyMUError(
            f"dymu was applied for vision_feature_layer={encoder.select_layer}, not {layer}: "
            "set it in the model config and apply again"
        )
    built = "default" if encoder.drop_cls else "full"
    if strategy is not None and strategy != built:
        raise DyMUError(
            f"dymu was applied for vision_feature_select_strategy={built!r}, not {strategy!r}: "
            "set it in the model config and apply again"
        )


def _llava_model(model: nn.Module) -> nn.Module:
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and all(
            hasattr(candidate, n)
            for n in ("vision_tower", "multi_modal_projector", "language_model")
        ):
            return candidate
    raise DyMUError(f"{type(model).__name__} is not a transformers Llava model")
