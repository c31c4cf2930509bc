"""One entry point for every transformers VLM dymu serves: ``dymu.apply`` / ``dymu.remove``.

They dispatch on the model's class to the family's integration (the LLaVA family:
:mod:`.hf_llava`; Qwen2-VL and Qwen2.5-VL: :mod:`.hf_qwen_vl`), which patches the instance
and restores it exactly. Any other class is refused in one line that lists what is served.
A new VLM family is one integration module plus one line in ``FAMILIES``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import nn

from ..errors import DyMUError
from ..thresholds import Thresholds

# integration module -> the transformers classes it serves (outer and inner models)
FAMILIES = {
    "hf_llava": (
        "LlavaForConditionalGeneration",
        "LlavaModel",
        "LlavaNextForConditionalGeneration",
        "LlavaNextModel",
        "LlavaOnevisionForConditionalGeneration",
        "LlavaOnevisionModel",
    ),
    "hf_qwen_vl": (
        "Qwen2VLForConditionalGeneration",
        "Qwen2VLModel",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen2_5_VLModel",
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
    ),
}


def inner_model(model: nn.Module, classes: dict[str, str], who: str) -> nn.Module:
    """The inner model (``LlavaModel``, ``Qwen2_5_VLModel``, ...) of a model whose class is
    one of ``classes`` (outer name -> inner name, in transformers) or one of their inner
    classes; any other is refused in one line naming ``who`` and what it serves."""
    import transformers

    outer = tuple(getattr(transformers, name) for name in classes)
    inner = tuple(getattr(transformers, name) for name in classes.values())
    if isinstance(model, outer):
        return model.model
    if isinstance(model, inner):
        return model
    raise DyMUError(
        f"dymu's {who} supports {', '.join(classes)} (and their inner models), "
        f"not {type(model).__name__}"
    )


def integration_for(model: nn.Module) -> ModuleType:
    """The integration module serving ``model``'s class (or a subclass of one)."""
    names = {
        cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers")
    }
    for module, classes in FAMILIES.items():
        if names & set(classes):
            return importlib.import_module(f"{__package__}.{module}")
    served = ", ".join(c for classes in FAMILIES.values() for c in classes if "For" in c)
    raise DyMUError(f"dymu.apply does not serve {type(model).__name__}; it serves {served}")


def apply(
    model: nn.Module,
    thresholds: str | os.PathLike | Thresholds | None = None,
    vtu: bool = True,
    **options,
) -> nn.Module:
    """Patch a transformers VLM in place with DyMU (``thresholds``) and, with ``vtu``,
    virtual token unmerging in its language model; idempotent. ``options`` go to the family's
    ``apply`` (the LLaVA family takes ``r=`` for fixed-r ToMe)."""
    return integration_for(model).apply(model, thresholds=thresholds, vtu=vtu, **options)


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the instances hold exactly what they held before."""
    return integration_for(model).remove(model)
