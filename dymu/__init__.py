"""dymu: dynamic token merging (DyMU) for vision transformers and VLMs, training-free.

The public names are imported on first use (PEP 562), so ``import dymu`` and its light
modules (``dymu.errors``, ``dymu.engine.schedule``, ...) do not pull in open_clip or
transformers. The package is laid out by stage, in data-flow order (README: How it fits
together): the ground floor (errors, patching, the thresholds format) directly in ``dymu/``,
then ``sources``, ``towers``, ``engine``, ``encoder``, ``calibration``, ``lm``,
``integrations`` and ``cli``; each imports only the ones before it. Module paths from before
this layout (``dymu.vtu``, ``dymu.job``, ...) still import (:mod:`dymu._moved`).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from . import _moved
from ._version import __version__

_moved.install()

# public name -> the submodule defining it
_LAZY = {
    "DyMUEncoder": "encoder.model",
    "EncoderOutput": "encoder.model",
    "DyMUError": "errors",
    "Thresholds": "thresholds",
    "apply": "integrations.dispatch",
    "apply_tome": "encoder.tome",
    "apply_vtu": "lm.vtu",
    "build_encoder": "encoder.factory",
    "find_thresholds": "calibration.loop",
    "load_encoder": "encoder.factory",
    "make_schedule": "engine.schedule",
    "remove": "integrations.dispatch",
    "remove_tome": "encoder.tome",
    "remove_vtu": "lm.vtu",
    "resolve_name": "encoder.names",
}

__all__ = [
    "DyMUEncoder",
    "DyMUError",
    "EncoderOutput",
    "Thresholds",
    "__version__",
    "apply",
    "apply_tome",
    "apply_vtu",
    "build_encoder",
    "find_thresholds",
    "load_encoder",
    "make_schedule",
    "remove",
    "remove_tome",
    "remove_vtu",
    "resolve_name",
]

if TYPE_CHECKING:
    from .calibration.loop import find_thresholds
    from .encoder.factory import build_encoder, load_encoder
    from .encoder.model import DyMUEncoder, EncoderOutput
    from .encoder.names import resolve_name
    from .encoder.tome import apply_tome, remove_tome
    from .engine.schedule import make_schedule
    from .errors import DyMUError
    from .integrations.dispatch import apply, remove
    from .lm.vtu import apply_vtu, remove_vtu
    from .thresholds import Thresholds


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
