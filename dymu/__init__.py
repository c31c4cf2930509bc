"""dymu: dynamic token merging (DyMU) for vision transformers and VLMs, training-free.

The public names are imported on first use (PEP 562), so ``import dymu`` and its light
modules (``dymu.errors``, ``dymu.schedule``, ...) do not pull in open_clip or transformers.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule defining it
_LAZY = {
    "DyMUEncoder": "encoder",
    "EncoderOutput": "encoder",
    "DyMUError": "errors",
    "Thresholds": "thresholds",
    "apply_tome": "tome",
    "apply_vtu": "vtu",
    "build_encoder": "factory",
    "find_thresholds": "calibrate",
    "load_encoder": "factory",
    "make_schedule": "schedule",
    "remove_tome": "tome",
    "remove_vtu": "vtu",
    "resolve_name": "names",
}

__all__ = [
    "DyMUEncoder",
    "DyMUError",
    "EncoderOutput",
    "Thresholds",
    "__version__",
    "apply_tome",
    "apply_vtu",
    "build_encoder",
    "find_thresholds",
    "load_encoder",
    "make_schedule",
    "remove_tome",
    "remove_vtu",
    "resolve_name",
]

if TYPE_CHECKING:
    from .calibrate import find_thresholds
    from .encoder import DyMUEncoder, EncoderOutput
    from .errors import DyMUError
    from .factory import build_encoder, load_encoder
    from .names import resolve_name
    from .schedule import make_schedule
    from .thresholds import Thresholds
    from .tome import apply_tome, remove_tome
    from .vtu import apply_vtu, remove_vtu


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first access (then cached); a
    submodule (``dymu.thresholds``), imported when first named."""
    module = _LAZY.get(name)
    if module is None:
        if "." in name or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
