"""Vision-tower adapters, registered in one place.

``ADAPTERS`` lists every adapter as ``module:Class``; :func:`adapt` asks each in order whether
it ``supports`` a module. An adapter file imports its own library (timm, transformers); when
that library is not installed the adapter is left out, since no module of that library can
exist. A new tower family is one new file plus one line here. Beside the adapters:
``weights`` checks that named open_clip weights can be had before a run starts, and
``hf_folder`` loads the vision tower of a transformers folder.
"""

from __future__ import annotations

import importlib

from torch import nn

from ..errors import DyMUError
from .base import TowerAdapter

ADAPTERS = (
    "open_clip:OpenCLIPTower",
    "timm_vit:TimmViTTower",
    "hf_clip:HFCLIPTower",
    "hf_siglip:HFSiglipTower",
    "hf_siglip:HFSiglip2Tower",
    "hf_vit:HFViTTower",
    "hf_dinov2:Dinov2Tower",
    "hf_qwen_vl:QwenVisionTower",  # flat patch runs in 2x2 units: encoder.qwen runs these
)

__all__ = [
    "ADAPTERS",
    "TowerAdapter",
    "adapt",
    "adapter_classes",
    "adapter_for",
    "supported_families",
]


def _load(entry: str) -> type[TowerAdapter] | None:
    module, name = entry.split(":")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ImportError:  # the tower's library is not installed
        return None


def adapter_classes() -> list[type[TowerAdapter]]:
    """The registered adapters whose libraries are installed, in registry order."""
    return [cls for cls in map(_load, ADAPTERS) if cls is not None]


def adapter_for(module: nn.Module) -> type[TowerAdapter] | None:
    """The first registered adapter that supports ``module``, if any."""
    return next((cls for cls in adapter_classes() if cls.supports(module)), None)


def supported_families() -> str:
    """The tower families the installed adapters serve, for error messages."""
    return "; ".join(cls.family for cls in adapter_classes())


def adapt(tower: nn.Module) -> TowerAdapter:
    """The adapter for a vision tower instance (a clear error when none serves it)."""
    cls = adapter_for(tower)
    if cls is None:
        raise DyMUError(
            f"no dymu adapter for {type(tower).__module__}.{type(tower).__name__}; "
            f"supported towers: {supported_families()}"
        )
    return cls(tower)


def __getattr__(name: str) -> type[TowerAdapter]:
    """``from dymu.towers import HFCLIPTower`` and the like, imported on first use."""
    for entry in ADAPTERS:
        if entry.endswith(f":{name}"):
            cls = _load(entry)
            if cls is not None:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
