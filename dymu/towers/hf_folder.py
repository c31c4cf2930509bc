"""A local transformers folder (``save_pretrained``) -> its vision tower, nothing else.

A vision model folder (``CLIPVisionModel``, ``SiglipVisionModel``, ``ViTModel``, ...) loads
with transformers' own ``from_pretrained``. A folder whose config has a ``vision_config`` (a
VLM such as LLaVA, or a dual encoder such as ``CLIPModel``) builds only the tower from that
config and reads only its tensors from the safetensors files, so calibrating a 7B VLM's
tower never loads the language model.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import DyMUError
from ..quiet import transformers_bars, verbose

log = logging.getLogger(__name__)


def load_vision_tower(
    folder: str | Path, dtype: torch.dtype | None = None
) -> tuple[nn.Module, dict[str, tuple[float, ...]]]:
    """The folder's vision tower (eval mode) and the image mean/std its processor records."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:
        raise DyMUError(
            "loading a transformers folder needs transformers: pip install 'dymu[vlm]'"
        ) from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise DyMUError(f"{folder} is not a transformers model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        vision = getattr(config, "vision_config", None)
        if vision is None:
            with transformers_bars(verbose()):  # "Loading weights" only with --verbose
                tower = AutoModel.from_pretrained(folder, local_files_only=True)
        else:
            tower = _tower_from_config(vision)
            _load_tower_weights(tower, folder)
    except DyMUError:
        raise
    except Exception as exc:  # transformers raises many kinds for unknown or broken folders
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DyMUError(f"cannot load a vision model from {folder}: {text}") from None
    if dtype is not None:
        tower = tower.to(dtype)
    return tower.eval(), _image_stats(folder)


def _tower_from_config(vision) -> nn.Module:
    """The tower for a VLM's ``vision_config``: transformers' ``AutoModel`` where it maps the
    config, else the model class its own modeling module declares for that config (Qwen2-VL's
    tower has no ``AutoModel`` entry)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_config(vision)
    except ValueError:
        module = importlib.import_module(
            type(vision).__module__.replace(".configuration_", ".modeling_")
        )
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and getattr(value, "config_class", None) is type(vision)
                and not value.__name__.endswith("PreTrainedModel")  # the family's base class
            ):
                return value._from_config(vision)
        raise


def _load_tower_weights(tower: nn.Module, folder: Path) -> None:
    """Fill ``tower`` from the folder's checkpoint, whatever prefix its keys carry there
    (``model.vision_tower.``, ``vision_tower.vision_model.``, ``vision_model.``, ...)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DyMUError(f"{folder} holds no .safetensors weights (save with save_pretrained)")
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            where.update(dict.fromkeys(fh.keys(), file))
    wanted = list(tower.state_dict())
    prefix = _find_prefix(wanted, where)
    if prefix is None:
        raise DyMUError(
            f"{folder}: found no complete set of vision-tower weights "
            f"(no keys ending in {wanted[0]!r} with every other tower key beside them)"
        )
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            for key in wanted:
                if where[prefix + key] == file:
                    state[key] = fh.get_tensor(prefix + key)
    tower.load_state_dict(state, strict=True)
    log.info("loaded the vision tower from %s (keys under %r)", folder, prefix)


def _find_prefix(wanted: list[str], available: dict[str, Path]) -> str | None:
    """The key prefix under which every tower key exists (preferring a 'vision' one)."""
    anchor = wanted[0]
    candidates = {
        key[: len(key) - len(anchor)]
        for key in available
        if key == anchor or key.endswith("." + anchor)
    }
    for prefix in sorted(candidates, key=lambda p: ("vision" not in p, len(p))):
        if all(prefix + key in available for key in wanted):
            return prefix
    return None


def _image_stats(folder: Path) -> dict[str, tuple[float, ...]]:
    """``image_mean``/``image_std`` from the folder's processor config, when it has one."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text())
        config = config.get("image_processor", config)
        if "image_mean" in config and "image_std" in config:
            return {"mean": tuple(config["image_mean"]), "std": tuple(config["image_std"])}
    return {}
