"""The encoder: a tower, the engine and thresholds giving variable-length tokens.

``model`` holds :class:`DyMUEncoder` and :class:`EncoderOutput`, ``factory`` builds one from
a name, a transformers folder or a model instance (``build_encoder``/``load_encoder``),
``names`` parses ``<model>-tome[-<K>out][-<schedule>]``, ``tome`` patches a classifier in
place (ToMe mode), ``visualize`` draws merged groups. ``DyMUEncoder`` and ``EncoderOutput``
are importable from here; they load on first use so that the light modules stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"DyMUEncoder", "EncoderOutput"}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(".model", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
