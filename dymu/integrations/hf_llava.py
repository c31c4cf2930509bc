"""DyMU in transformers' LLaVA family: ``LlavaForConditionalGeneration`` (llava-1.5-hf),
``LlavaNextForConditionalGeneration`` (LLaVA-1.6 / NeXT) and
``LlavaOnevisionForConditionalGeneration`` (images, multi-image, video).

``apply(model, thresholds=...)`` patches the instance (``apply(model, r=...)``: ToMe's fixed
``r`` per block instead, every image at the same length, for comparisons at equal budget).
Every crop and frame the model would feed its vision tower goes through the DyMU encoder
over the tower's own weights, in one padded batch; the projector runs on the merged tokens
(each image's real ones, packed).
Everything after the projector (AnyRes grids, unpadding, newline tokens, video pooling,
anyres_max interpolation) is the model's own code, run on the merged features expanded to
full grids, so the prompt keeps the unmodified model's layout and length. With ``vtu=True``
the language model runs virtual token unmerging; its mapping comes from the same code run on
markers (:mod:`dymu.lm.layouts`). With ``vtu=False`` the language model runs unchanged on that
full-length prompt (the encoder's effect alone). ``model.generate(**processor(...))`` works
unchanged; ``remove`` puts back exactly what was there.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
from torch import nn

from ..encoder.model import DyMUEncoder, EncoderOutput
from ..engine.packing import Packing
from ..engine.schedule import ToMeR, make_schedule, tome_schedule
from ..errors import DyMUError
from ..lm.layouts import marker_rows, place_keys, read_markers, slot_mapping
from ..lm.vtu import apply_vtu, expand_groups, patch_forward_with_mapping, remove_vtu
from ..patching import call_prior, named_arguments, patch, temporarily, unpatch
from ..thresholds import Thresholds
from ..towers import adapt
from .dispatch import inner_model

_STATE = "_dymu_llava"
CLASSES = {  # outer class -> its inner model class, in transformers
    "LlavaForConditionalGeneration": "LlavaModel",
    "LlavaNextForConditionalGeneration": "LlavaNextModel",
    "LlavaOnevisionForConditionalGeneration": "LlavaOnevisionModel",
}
# modality -> (forward's pixel argument, the model's feature method, placeholder token id)
_MODALITIES = {
    "image": ("pixel_values", "get_image_features", "image_token_id"),
    "video": ("pixel_values_videos", "get_video_features", "video_token_id"),
}


@dataclass
class _State:
    encoder: DyMUEncoder
    vtu: bool


def build_encoder(
    model: nn.Module,
    thresholds: str | os.PathLike | Thresholds | None = None,
    r_total: int = 0,
    schedule: str | list[int] = "constant",
    r: ToMeR | None = None,
) -> DyMUEncoder:
    """The DyMU encoder over a LLaVA model's vision tower (also what calibration runs on).

    It follows the model's feature layer and class-token choice. With ``thresholds``, their
    per-block ``r`` is the schedule; with ``r`` (ToMe's int, list or ``(r, inflection)``)
    every image merges exactly that many tokens per block; with neither, ``r_total`` and
    ``schedule`` give one (for :func:`dymu.find_thresholds`).
    """
    vlm = _vlm(model)
    layer = vlm.config.vision_feature_layer
    if not isinstance(layer, int):
        raise DyMUError(f"dymu supports one vision feature layer, this model uses {layer}")
    tower = adapt(vlm.vision_tower)
    drop_cls = vlm.config.vision_feature_select_strategy == "default"
    if thresholds is not None and r is not None:
        raise DyMUError("give thresholds (DyMU) or r (fixed-r ToMe), not both")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.load(thresholds)
    name = "hf-llava-tome"
    if thresholds is not None:
        per_block, name = thresholds.r.tolist(), thresholds.metadata.get("model", name)
    elif r is not None:
        per_block = tome_schedule(r, tower.num_blocks)
    else:
        per_block = make_schedule(r_total, tower.num_blocks, schedule)
    encoder = DyMUEncoder(
        tower, per_block, select_layer=layer, drop_cls=drop_cls, name=name, fixed_r=r is not None
    )
    if thresholds is not None:
        encoder.set_thresholds(thresholds)
    return encoder.eval()


def apply(
    model: nn.Module,
    thresholds: str | os.PathLike | Thresholds | None = None,
    vtu: bool = True,
    r: ToMeR | None = None,
) -> nn.Module:
    """Patch a transformers LLaVA, LLaVA-NeXT or LLaVA-OneVision model in place; idempotent.

    ``thresholds``: DyMU, each image keeps the tokens its content needs. ``r`` instead: ToMe's
    fixed number merged per block (every image keeps the same number).
    ``vtu=True``: the language model (Llama, Mistral, Qwen2, ...) runs virtual unmerging.
    ``vtu=False``: it runs unchanged on the full-length prompt of repeated merged features.
    """
    vlm = _vlm(model)
    if _STATE in vlm.__dict__:
        return model
    if thresholds is None and r is None:
        raise DyMUError("hf_llava.apply needs thresholds=FILE (DyMU) or r=... (fixed-r ToMe)")
    encoder = build_encoder(model, thresholds, r=r)
    if vtu:
        apply_vtu(vlm.language_model)
    # kept out of the module tree: the encoder reads the tower's own parameters
    vlm.__dict__[_STATE] = _State(encoder, vtu)
    for method in _methods(vlm):  # what forward and generate() call to encode
        patch(vlm, method, _feature_method(method))
    patch(vlm, "forward", _forward)
    if vtu and model is not vlm:  # generate() encodes before the first forward: add the mapping
        patch(model, "generate", _generate)
        patch_forward_with_mapping(model)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the instances hold exactly what they held before."""
    vlm = _vlm(model)
    state = vlm.__dict__.pop(_STATE, None)
    if state is None:
        return model
    for method in (*_methods(vlm), "forward"):
        unpatch(vlm, method)
    if model is not vlm:
        unpatch(model, "generate")
        unpatch(model, "forward")
    if state.vtu:
        remove_vtu(vlm.language_model)
    return model


def encoder_of(model: nn.Module) -> DyMUEncoder | None:
    """The DyMU encoder :func:`apply` put in ``model`` (None when not applied), e.g. for a
    forward hook that counts the tokens each image keeps (the lmms-eval plugin does)."""
    state = _vlm(model).__dict__.get(_STATE)
    return None if state is None else state.encoder


def _methods(vlm: nn.Module) -> list[str]:
    return [m for _, m, _ in _MODALITIES.values() if hasattr(type(vlm), m)]


def _feature_method(method: str):
    def features(self: nn.Module, *args, **kwargs):
        """The model's own feature method, with DyMU's encoder in place of the tower."""
        state: _State = self.__dict__[_STATE]
        call = named_arguments(getattr(type(self), method), self, args, kwargs)
        _check_feature_choice(state.encoder, call)
        return _run_vision(self, state.encoder, method, call)[0]

    features.__name__ = method
    return features


def _forward(self: nn.Module, *args, **kwargs):
    """The model's forward, encoding with DyMU first (and passing the VTU mapping)."""
    kwargs = named_arguments(type(self).forward, self, args, kwargs)
    if any(kwargs.get(arg) is not None for arg, _, _ in _MODALITIES.values()):
        kwargs = _encode(self, kwargs)
    return call_prior(self, "forward", **kwargs)


def _generate(self: nn.Module, *args, **kwargs):
    """``generate()`` with images encoded by DyMU up front and the VTU mapping passed along
    (transformers encodes images before the first forward call)."""
    if args:  # generate(input_ids, ...): the prompt is its first argument, ``inputs``
        kwargs, args = {"inputs": args[0], **kwargs}, args[1:]
    if any(kwargs.get(arg) is not None for arg, _, _ in _MODALITIES.values()):
        kwargs = _encode(_vlm(self), kwargs)
    return call_prior(self, "generate", *args, **kwargs)


def _encode(vlm: nn.Module, kwargs: dict) -> dict:
    """Forward/generate arguments with the pixels replaced by DyMU's encoder outputs and,
    with VTU, the mapping of the prompt (from the model's arrangement run on markers)."""
    state: _State = vlm.__dict__[_STATE]
    kwargs = dict(kwargs)
    _check_feature_choice(state.encoder, kwargs)
    input_ids = kwargs.get("input_ids", kwargs.get("inputs"))
    if state.vtu and input_ids is None:
        raise DyMUError("DyMU with VTU needs input_ids to find the image tokens")
    outputs, keys, first_key = dict(kwargs.get("mm_encoder_outputs") or {}), None, 0
    consumed: set[str] = set()
    for modality, (arg, method, token) in _MODALITIES.items():
        if kwargs.get(arg) is None:
            continue
        call = _method_kwargs(vlm, method, kwargs.pop(arg), kwargs)
        consumed.update(call)
        outputs[modality], out = _run_vision(vlm, state.encoder, method, call)
        if state.vtu:
            # keys of this and earlier calls (the host knows the lengths after the forward)
            host = out.host_lengths
            num_keys = first_key + (sum(host) if host is not None else int(out.lengths.sum()))
            trace = (out, first_key, num_keys)
            traced, _ = _run_vision(vlm, state.encoder, method, call, trace=trace)
            first_key = num_keys
            found = read_markers(_sequence_rows(traced.pooler_output), first_key)
            mask = input_ids == getattr(vlm.config, token)
            placed = place_keys(mask, found, modality)
            keys = placed if keys is None else torch.where(mask, placed, keys)
    for name in consumed:  # image sizes and the like: only the encoding needed them
        kwargs.pop(name, None)
    kwargs["mm_encoder_outputs"] = outputs
    if keys is not None:
        kwargs["vtu_mapping"] = slot_mapping(keys, num_keys=first_key)
    return kwargs


def _run_vision(
    vlm: nn.Module,
    encoder: DyMUEncoder,
    method: str,
    call: dict,
    trace: tuple[EncoderOutput, int, int] | None = None,
):
    """Run the model's own ``get_image_features`` / ``get_video_features`` with DyMU in it.

    For the length of the call the tower is stood in for by the DyMU encoder (which sees
    exactly the crops or frames the tower would) and the projector's output by the projected
    merged tokens expanded over their groups. With ``trace=(encoded, first_key, num_keys)`` the
    projector's output is marker rows instead and nothing is encoded. Returns the method's
    output and the encoder output.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tower, projector = encoder.tower, vlm.multi_modal_projector
    project = projector.forward  # the projector as it is now (a wrapper included)
    record: dict[str, EncoderOutput] = {}

    def tower_forward(pixel_values: torch.Tensor, *args, **kwargs):
        record["out"] = trace[0] if trace is not None else encoder(pixel_values)
        # shape-only stand-ins for the hidden states the model selects from
        filler = pixel_values.new_zeros(()).expand(
            pixel_values.shape[0], tower.num_tokens, tower.width
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=filler, hidden_states=(filler,) * (tower.num_blocks + 1)
        )

    def projector_forward(selected: torch.Tensor) -> torch.Tensor:
        out = record["out"]
        if tuple(selected.shape[:2]) != tuple(out.groups.shape):
            raise DyMUError(
                f"{type(vlm).__name__} selected features of shape {tuple(selected.shape[:2])} "
                f"where dymu encoded {tuple(out.groups.shape)}: this feature selection is not "
                "supported"
            )
        if trace is not None:
            width = vlm.config.text_config.hidden_size
            lengths = out.lengths if out.host_lengths is None else out.host_lengths
            return marker_rows(out.groups, lengths, width, *trace[1:])
        return expand_groups(_project_real_tokens(project, out), out.groups)

    with temporarily(vlm.vision_tower, "forward", tower_forward):
        with temporarily(projector, "forward", projector_forward):
            result = call_prior(vlm, method, **call)
    return result, record["out"]


def _project_real_tokens(project, out: EncoderOutput) -> torch.Tensor:
    """The projector on every image's real tokens only, packed (at batch 16 with kept counts
    of 27 to 283, 1298 rows instead of 16 x 283), then padded again for the group gather."""
    lengths = out.host_lengths
    if lengths is None or len(set(lengths)) == 1:
        return project(out.tokens)
    packing = Packing.from_lengths(list(lengths), out.tokens.device)
    return packing.pad(project(packing.pack(out.tokens)[None])[0])


def _sequence_rows(features) -> torch.Tensor:
    """The feature rows in the order the model scatters them into its placeholder tokens."""
    if isinstance(features, (list, tuple)) and len(features) == 1:
        features = features[0]
    if isinstance(features, (list, tuple)):
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def _method_kwargs(vlm: nn.Module, method: str, pixels: torch.Tensor, kwargs: dict) -> dict:
    """Arguments for the feature method: the pixels, and what the forward call gave that the
    method takes (image sizes, images per sample, ...)."""
    params = list(inspect.signature(getattr(type(vlm), method)).parameters.values())[1:]
    named = [p.name for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    call = {named[0]: pixels, "return_dict": True}
    call.update({n: kwargs[n] for n in named[1:] if kwargs.get(n) is not None})
    return call


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


def _vlm(model: nn.Module) -> nn.Module:
    """The inner model (``LlavaModel`` and kin) of a supported class; others are refused."""
    return inner_model(model, CLASSES, "hf_llava")
