"""DyMU in transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration`` and their inner
models): images, several images per prompt, video.

``apply(model, thresholds=...)`` patches the instance. The vision tower is stood in for by
:class:`~dymu.encoder.qwen.QwenDyMUEncoder` over the tower's own weights; it merges whole 2x2
units, so each merged token is one LLM token shared by the units of its group. The model's
own feature methods, placeholder scatter and M-RoPE position code then run on the merged
tokens repeated over their units: the prompt keeps the unmodified model's layout, length and
3D positions (``rope_deltas`` stay the model's own bookkeeping). With ``vtu=True`` the language
model runs virtual token unmerging with one slot per merged token (:mod:`dymu.lm.vtu`: its
attention calls the family's own rotary function with the full-length 3D positions); with
``vtu=False`` it runs unchanged. Qwen3-VL's DeepStack features follow the same mapping: the
DeepStack mergers read the merged tokens of their blocks, repeated over their units, and under
VTU the language model adds each slot the mean of its positions' DeepStack rows (as VTU
averages everything per slot). ``generate()`` works as before; ``remove`` restores exactly.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..encoder.model import EncoderOutput
from ..encoder.qwen import QwenDyMUEncoder, expand_units
from ..engine.packing import Packing, upload
from ..engine.schedule import make_schedule
from ..errors import DyMUError
from ..lm.layouts import place_keys, slot_mapping
from ..lm.slots import SlotPlan
from ..lm.vtu import apply_vtu, patch_forward_with_mapping, remove_vtu
from ..patching import call_prior, named_arguments, patch, temporarily, unpatch
from ..thresholds import Thresholds
from .dispatch import inner_model

_STATE = "_dymu_qwen_vl"
CLASSES = {  # outer class -> its inner model class, in transformers
    "Qwen2VLForConditionalGeneration": "Qwen2VLModel",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2_5_VLModel",
    "Qwen3VLForConditionalGeneration": "Qwen3VLModel",
}
# modality -> (pixel argument, grid argument, the model's feature method, placeholder token)
_MODALITIES = {
    "image": ("pixel_values", "image_grid_thw", "get_image_features", "image_token_id"),
    "video": ("pixel_values_videos", "video_grid_thw", "get_video_features", "video_token_id"),
}


@dataclass
class _State:
    encoder: QwenDyMUEncoder
    vtu: bool
    # outputs encoded ahead of the model's own feature call (forward / generate with VTU)
    ready: dict[str, EncoderOutput] = field(default_factory=dict)
    # the language model's slot plan during a VTU forward (for DeepStack's additions)
    plan: list = field(default_factory=list)
    handles: list = field(default_factory=list)


def build_encoder(
    model: nn.Module,
    thresholds: str | os.PathLike | Thresholds | None = None,
    r_total: int = 0,
    schedule: str | list[int] = "constant",
) -> QwenDyMUEncoder:
    """The DyMU encoder over a Qwen-VL model's vision tower (what calibration runs on):
    the thresholds' schedule, or one made from ``r_total`` merges per window."""
    vlm = _vlm(model)
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.load(thresholds)
    blocks = len(vlm.visual.blocks)
    if thresholds is not None:
        per_block, name = thresholds.r.tolist(), thresholds.metadata.get("model")
    else:
        per_block, name = make_schedule(r_total, blocks, schedule), None
    encoder = QwenDyMUEncoder(vlm.visual, per_block, name=name or f"hf-{type(vlm).__name__}")
    if thresholds is not None:
        encoder.set_thresholds(thresholds)
    return encoder.eval()


def apply(
    model: nn.Module, thresholds: str | os.PathLike | Thresholds | None = None, vtu: bool = True
) -> nn.Module:
    """Patch a transformers Qwen2-VL or Qwen2.5-VL model in place; idempotent."""
    vlm = _vlm(model)
    if _STATE in vlm.__dict__:
        return model
    if thresholds is None:
        raise DyMUError("hf_qwen_vl.apply needs thresholds=FILE (calibrated for this tower)")
    encoder = build_encoder(model, thresholds)
    state = _State(encoder, vtu)
    if vtu:
        apply_vtu(vlm.language_model)
        if hasattr(type(vlm.language_model), "_deepstack_process"):
            _follow_deepstack(vlm.language_model, state)
    vlm.__dict__[_STATE] = state  # out of the module tree: shares the weights
    for modality in _MODALITIES:
        method = _MODALITIES[modality][2]
        if hasattr(type(vlm), method):
            patch(vlm, method, _feature_method(modality))
    patch(vlm, "forward", _forward)
    if vtu and model is not vlm:
        patch(model, "generate", _generate)
        patch_forward_with_mapping(model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the instances hold exactly what they held before."""
    vlm = _vlm(model)
    state = vlm.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for _, _, method, _ in _MODALITIES.values():
        if hasattr(type(vlm), method):
            unpatch(vlm, method)
    unpatch(vlm, "forward")
    if model is not vlm and state.vtu:
        unpatch(model, "generate")
        unpatch(model, "forward")
    if state.vtu:
        for handle in state.handles:
            handle.remove()
        if state.handles:
            unpatch(vlm.language_model, "_deepstack_process")
        remove_vtu(vlm.language_model)
    return model


def encoder_of(model: nn.Module) -> QwenDyMUEncoder | None:
    """The encoder :func:`apply` put in ``model`` (None when not applied)."""
    state = _vlm(model).__dict__.get(_STATE)
    return None if state is None else state.encoder


def _feature_method(modality: str):
    pixels_arg, grid_arg, method, _ = _MODALITIES[modality]

    def features(self: nn.Module, *args, **kwargs):
        """The model's own feature method, with DyMU's merged tokens in place of the tower's."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        state: _State = self.__dict__[_STATE]
        call = named_arguments(getattr(type(self), method), self, args, kwargs)
        out = state.ready.pop(modality, None)
        if out is None:
            out = state.encoder(call[pixels_arg], call[grid_arg])
        rows = expand_units(out)
        output = BaseModelOutputWithPooling
        extra = {}
        if out.features:  # Qwen3-VL: the family's output class, DeepStack rows beside
            output = sys.modules[type(self).__module__].BaseModelOutputWithDeepstackFeatures
            extra = {"deepstack_features": [expand_units(f) for f in out.features]}

        def tower_forward(*_args, **_kwargs):
            return output(last_hidden_state=None, pooler_output=rows, **extra)

        with temporarily(self.visual, "forward", tower_forward):
            return call_prior(self, method, **call)

    features.__name__ = method
    return features


def _follow_deepstack(lm: nn.Module, state: _State) -> None:
    """Qwen3-VL's DeepStack under VTU: its additions to visual positions go to their slots.

    The text model adds DeepStack rows at the visual positions of its full-length hidden
    states (``_deepstack_process``); under VTU those are packed slots. The rows are placed at
    full length and averaged per slot with the forward's plan, which a pre-hook keeps.
    """

    def keep_plan(module, args, kwargs):
        plan = kwargs.get("vtu_mapping")
        state.plan[:] = [plan] if isinstance(plan, SlotPlan) else []

    def drop_plan(module, args, kwargs, output):
        state.plan.clear()

    def deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        plan = state.plan[0] if state.plan else None
        if plan is None or hidden_states.shape[:2] == tuple(visual_pos_masks.shape):
            return call_prior(
                self, "_deepstack_process", hidden_states, visual_pos_masks, visual_embeds
            )
        mask = visual_pos_masks.to(hidden_states.device)
        rows = hidden_states.new_zeros(*mask.shape, hidden_states.shape[-1])
        rows[mask] = visual_embeds.to(hidden_states.device, hidden_states.dtype)
        return hidden_states + plan.pack(rows)[None]

    state.handles += [
        lm.register_forward_pre_hook(keep_plan, with_kwargs=True),
        lm.register_forward_hook(drop_plan, with_kwargs=True),
    ]
    patch(lm, "_deepstack_process", deepstack_process)


def _forward(self: nn.Module, *args, **kwargs):
    """The model's forward, encoding first to pass the VTU mapping along."""
    state: _State = self.__dict__[_STATE]
    kwargs = named_arguments(type(self).forward, self, args, kwargs)
    encoded_here = False
    if state.vtu and _has_pixels(kwargs):
        encoded_here = not state.ready
        kwargs = _encode(self, kwargs)
    try:
        return call_prior(self, "forward", **kwargs)
    finally:
        if encoded_here:
            state.ready.clear()


def _generate(self: nn.Module, *args, **kwargs):
    """``generate()`` with the images encoded up front and the VTU mapping passed along
    (transformers 5.2x encodes images before the first forward call)."""
    if args:  # generate(input_ids, ...): the prompt is its first argument, ``inputs``
        kwargs, args = {"inputs": args[0], **kwargs}, args[1:]
    vlm = _vlm(self)
    state: _State = vlm.__dict__[_STATE]
    if not _has_pixels(kwargs):
        return call_prior(self, "generate", *args, **kwargs)
    try:
        return call_prior(self, "generate", *args, **_encode(vlm, kwargs))
    finally:
        state.ready.clear()


def _has_pixels(kwargs: dict) -> bool:
    return any(kwargs.get(arg) is not None for arg, _, _, _ in _MODALITIES.values())


def _encode(vlm: nn.Module, kwargs: dict) -> dict:
    """Encode every modality once (kept for the model's own feature call) and add the VTU
    mapping: a placeholder token takes its unit's merged token; others get their own slot."""
    state: _State = vlm.__dict__[_STATE]
    input_ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if input_ids is None:
        raise DyMUError("DyMU with VTU needs input_ids to find the image and video tokens")
    keys, first_key = None, 0
    for modality, (pixels_arg, grid_arg, _, token) in _MODALITIES.items():
        if kwargs.get(pixels_arg) is None:
            continue
        out = state.ready.get(modality)
        if out is None:
            out = state.encoder(kwargs[pixels_arg], kwargs[grid_arg])
            state.ready[modality] = out
        lengths = np.asarray(out.host_lengths)
        first = upload(np.cumsum(lengths) - lengths + first_key, out.groups.device)  # per frame
        units = Packing.from_lengths(out.host_inputs, out.groups.device)
        unit_keys = units.pack(out.groups + first[:, None])  # every unit, frame by frame
        first_key += sum(out.host_lengths)
        mask = input_ids == getattr(vlm.config, token)
        placed = place_keys(mask, unit_keys, modality)
        keys = placed if keys is None else torch.where(mask, placed, keys)
    kwargs = dict(kwargs)
    kwargs["vtu_mapping"] = slot_mapping(keys, num_keys=first_key)
    return kwargs


def _vlm(model: nn.Module) -> nn.Module:
    """The inner model (``Qwen2_5_VLModel`` and kin) of a supported class; others refused."""
    return inner_model(model, CLASSES, "hf_qwen_vl")
