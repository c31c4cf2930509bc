"""DyMU in the original LLaVA package (pip name ``llava-torch``), by tower name.

After :func:`enable`, a LLaVA-Llama or LLaVA-Mistral config with
``"mm_vision_tower": "ViT-L-14-336-tome"`` (any dymu name) builds a DyMU tower: open_clip
weights from ``dymu_pretrained`` (default ``openai``), thresholds from ``dymu_thresholds``
(default: looked up by name). Each merged token is repeated over its patches, so the prompt
keeps LLaVA's own layout, and with ``"dymu_vtu": true`` (the default) the LM runs virtual
token unmerging; with ``false`` it runs unchanged on that full-length prompt (as
``vtu=False`` in :mod:`dymu.integrations.hf_llava`). ``"dymu_direct": true`` instead feeds
the merged tokens directly (a shorter prompt, no VTU, one view per image). ``"dymu_r": 16``
(or a list, one per block) merges that many tokens per block in every image instead of
using thresholds (ToMe's fixed r, for comparisons at equal budget). LLaVA-1.6 anyres
crops (unpadded, with newline tokens) are followed by running LLaVA's own arrangement on
markers (:mod:`dymu.lm.layouts`). Models with other towers behave exactly as before;
:func:`disable` puts back every class attribute as it was. ``python -m
dymu.integrations.llava llava.eval.model_vqa ARGS`` runs one of LLaVA's scripts with DyMU.
"""

from __future__ import annotations

import argparse
import functools
import runpy
import sys

import torch

from ..encoder.names import resolve_name
from ..errors import DyMUError
from ..lm.layouts import marker_rows, read_markers, slot_mapping
from ..lm.vtu import apply_vtu
from ..lm.vtu_attention import forward_cache_argument
from .llava_tower import DyMULlavaTower

IGNORE_INDEX = -100  # LLaVA's label for positions without a target
SUPPORTED = {"llava_llama": "LLaVA-Llama", "llava_mistral": "LLaVA-Mistral"}
_MISSING = object()
_saved: dict[tuple[type, str], object] = {}  # what enable() replaced (_MISSING: nothing)


def _is_dymu_name(name: object) -> bool:
    if not isinstance(name, str) or "-tome" not in name:
        return False
    try:
        resolve_name(name)
    except DyMUError:
        return False
    return True


def _dymu_tower(model) -> DyMULlavaTower | None:
    tower = model.get_model().get_vision_tower()
    return tower if isinstance(tower, DyMULlavaTower) else None


def _check_language_model(cfg) -> None:
    model_type = getattr(cfg, "model_type", "llava_llama")
    if model_type not in SUPPORTED:
        raise DyMUError(
            f"dymu towers run in {' and '.join(SUPPORTED.values())} models, not {model_type} "
            "(VTU needs rotary attention)"
        )


def enable() -> None:
    """Make LLaVA build DyMU towers for dymu names (idempotent; :func:`disable` undoes it)."""
    if _saved:
        return
    import llava.model.llava_arch as arch
    import llava.model.multimodal_encoder.builder as builder
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    original = builder.build_vision_tower

    def build_vision_tower(cfg, **kwargs):
        name = getattr(cfg, "mm_vision_tower", getattr(cfg, "vision_tower", None))
        if _is_dymu_name(name):
            _check_language_model(cfg)
            return DyMULlavaTower(name, args=cfg, **kwargs)
        return original(cfg, **kwargs)

    patches = [
        (builder, "build_vision_tower", build_vision_tower),
        (arch, "build_vision_tower", build_vision_tower),
        (arch.LlavaMetaForCausalLM, "encode_images", _encode_images),
    ]
    for cls in (LlavaLlamaForCausalLM, LlavaMistralForCausalLM):
        patches += [(cls, "forward", _forward), (cls, "generate", _generate)]
    for owner, attr, value in patches:
        _saved[(owner, attr)] = owner.__dict__.get(attr, _MISSING)
        setattr(owner, attr, value)


def disable() -> None:
    """Put back every attribute :func:`enable` replaced, exactly (none is left behind)."""
    while _saved:
        (owner, attr), value = _saved.popitem()
        if value is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, value)


def _lm_class(model) -> type:
    """The transformers ``*ForCausalLM`` a LLaVA class builds on (Llama, Mistral)."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith("ForCausalLM"):
            return cls
    raise DyMUError(f"{type(model).__name__} has no transformers language model class")


def _original(model, name: str):
    """What ``name`` was on the patched class ``model`` is an instance of, bound to it."""
    for cls in type(model).__mro__:
        if (cls, name) in _saved:
            value = _saved[(cls, name)]
            if value is _MISSING:
                return getattr(super(cls, model), name)
            return value.__get__(model, type(model))
    return getattr(model, name)


def _encode_images(self, images):
    tower = _dymu_tower(self)
    if tower is not None and tower.tracing:
        groups, lengths = tower.last_groups
        embed = self.get_model().embed_tokens.weight
        return marker_rows(groups, lengths, embed.shape[1]).to(embed.dtype)
    if tower is None or not tower.direct:
        return _original(self, "encode_images")(images)
    projector = self.get_model().mm_projector
    return [projector(f) for f in tower(images)]


def _trace(self, input_ids, attention_mask, images, image_sizes) -> torch.Tensor:
    """``(B, N)``: the merged token each position of the sequence LLaVA builds holds (its
    key, see :mod:`dymu.lm.layouts`), -1 for text, padding and LLaVA's image_newline tokens.

    LLaVA's input preparation runs a second time with markers for features, so every
    arrangement it makes (anyres crops, unpadding, newlines) is followed, not re-implemented.
    """
    tower = _dymu_tower(self)
    tower.tracing = True
    try:
        prepared = self.prepare_inputs_labels_for_multimodal(
            input_ids, None, attention_mask, None, None, images, image_sizes
        )
    finally:
        tower.tracing = False
    keys = read_markers(prepared[4], int(tower.last_groups[1].sum()))
    return torch.where(prepared[2].bool(), keys, -1)


def _prepare(
    self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes
):
    """LLaVA's own input preparation, plus the VTU mapping of the sequence it builds.

    Text positions carry their original index through LLaVA's ``labels`` path; image
    positions are found by :func:`_trace`.
    """
    marker = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids).bool()
    _, position_ids, new_mask, past_key_values, embeds, placed = (
        self.prepare_inputs_labels_for_multimodal(
            input_ids, position_ids, mask, past_key_values, marker, images, image_sizes
        )
    )
    mapping = slot_mapping(_trace(self, input_ids, mask, images, image_sizes))
    if labels is not None:
        text = placed >= 0
        labels = torch.where(text, labels.gather(1, placed.clamp(min=0)), IGNORE_INDEX)
    new_mask = new_mask if attention_mask is not None else None
    return position_ids, new_mask, past_key_values, embeds, labels, mapping


def _uses_vtu(self, images) -> bool:
    tower = _dymu_tower(self)
    if tower is None or images is None:
        return False
    if tower.direct and (isinstance(images, list) or images.ndim == 5):
        raise DyMUError(
            "dymu_direct: true feeds merged tokens, one view per image; several views per "
            "image (anyres crops, LLaVA-1.6) need dymu_direct: false"
        )
    if not tower.vtu:
        return False
    apply_vtu(self.get_model())  # idempotent: the Llama runs VTU when given a mapping
    return True


def _forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    images=None,
    image_sizes=None,
    vtu_mapping=None,
    **kwargs,
):
    if inputs_embeds is None and images is not None:
        if not _uses_vtu(self, images) or input_ids.shape[1] == 1:  # LLaVA's own path
            return _original(self, "forward")(
                input_ids,
                attention_mask,
                position_ids,
                past_key_values,
                inputs_embeds,
                labels,
                images=images,
                image_sizes=image_sizes,
                **kwargs,
            )
        position_ids, attention_mask, past_key_values, inputs_embeds, labels, vtu_mapping = (
            _prepare(
                self,
                input_ids,
                position_ids,
                attention_mask,
                past_key_values,
                labels,
                images,
                image_sizes,
            )
        )
        input_ids = None
    if vtu_mapping is not None:
        kwargs["vtu_mapping"] = vtu_mapping
    if past_key_values is not None:  # a caller's own ``cache=`` wins, as transformers does
        kwargs.setdefault(_cache_argument(_lm_class(self)), past_key_values)
    return _lm_class(self).forward(
        self,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        labels=labels,
        **kwargs,
    )


@functools.cache
def _cache_argument(lm_class: type) -> str:
    """The KV-cache argument of ``lm_class.forward``, read once per class (not per step)."""
    return forward_cache_argument(lm_class.forward)


@torch.no_grad()
def _generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
    if not _uses_vtu(self, images):
        return _original(self, "generate")(inputs, images=images, image_sizes=image_sizes, **kwargs)
    from transformers.generation.utils import GenerationMixin

    position_ids = kwargs.pop("position_ids", None)
    attention_mask = kwargs.pop("attention_mask", None)
    position_ids, attention_mask, _, embeds, _, mapping = _prepare(
        self, inputs, position_ids, attention_mask, None, None, images, image_sizes
    )
    return GenerationMixin.generate(
        self,
        position_ids=position_ids,
        attention_mask=attention_mask,
        inputs_embeds=embeds,
        vtu_mapping=mapping,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m dymu.integrations.llava MODULE [ARGS]``: run a LLaVA script with DyMU."""
    parser = argparse.ArgumentParser(
        prog="python -m dymu.integrations.llava",
        description="Run a module of the llava package (e.g. llava.eval.model_vqa) with DyMU "
        "enabled: configs naming a dymu tower ('ViT-L-14-336-tome') get the DyMU encoder.",
    )
    parser.add_argument("module", help="the module to run, e.g. llava.eval.model_vqa")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    args = parser.parse_args(argv)
    enable()
    sys.argv = [args.module, *args.args]
    runpy.run_module(args.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # run through the importable module, so enable()'s state is shared
    from dymu.integrations.llava import main as _main

    _main()
