"""Module paths from before the stage layout still import: ``dymu.vtu`` is ``dymu.lm.vtu``.

One table, one import hook (first on ``sys.meta_path``, so ``dymu.adapters.base`` resolves to
the same module object as ``dymu.towers.base``, never a second copy).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED = {  # old path -> where it lives now
    "dymu.data": "dymu.sources.stream",
    "dymu.shards": "dymu.sources.shards",
    "dymu.hf_source": "dymu.sources.hf",
    "dymu.adapters": "dymu.towers",
    "dymu.adapters.base": "dymu.towers.base",
    "dymu.adapters.hf_clip": "dymu.towers.hf_clip",
    "dymu.adapters.hf_dinov2": "dymu.towers.hf_dinov2",
    "dymu.adapters.hf_siglip": "dymu.towers.hf_siglip",
    "dymu.adapters.hf_vit": "dymu.towers.hf_vit",
    "dymu.adapters.open_clip": "dymu.towers.open_clip",
    "dymu.adapters.timm_vit": "dymu.towers.timm_vit",
    "dymu.weights": "dymu.towers.weights",
    "dymu.hf_folder": "dymu.towers.hf_folder",
    "dymu.merge": "dymu.engine.merge",
    "dymu.attention": "dymu.engine.attention",
    "dymu.blocks": "dymu.engine.blocks",
    "dymu.schedule": "dymu.engine.schedule",
    "dymu.factory": "dymu.encoder.factory",
    "dymu.names": "dymu.encoder.names",
    "dymu.tome": "dymu.encoder.tome",
    "dymu.visualize": "dymu.encoder.visualize",
    "dymu.calibrate": "dymu.calibration.loop",
    "dymu.job": "dymu.calibration.job",
    "dymu.checkpoint": "dymu.calibration.checkpoint",
    "dymu.coverage": "dymu.calibration.coverage",
    "dymu.inference_counts": "dymu.calibration.inference_counts",
    "dymu.vtu": "dymu.lm.vtu",
    "dymu.layouts": "dymu.lm.layouts",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old path as the module at its new path (the same object)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        spec.loader_state = module.__spec__  # the import machinery overwrites __spec__ next
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state  # keep the module's own spec


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
