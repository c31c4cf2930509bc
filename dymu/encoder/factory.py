"""Build encoders from dymu names, local transformers folders and model instances, in one place."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from ..engine.schedule import make_schedule
from ..errors import DyMUError, MissingThresholds
from ..quiet import open_clip_logs
from ..thresholds import Thresholds, find_threshold_file, search_paths
from ..towers import TowerAdapter, adapter_for, supported_families
from ..towers.hf_qwen_vl import QwenVisionTower
from ..towers.weights import check_weights_reachable
from .model import DyMUEncoder
from .names import resolve_name
from .qwen import QwenDyMUEncoder

log = logging.getLogger(__name__)

_NO_WEIGHTS = ("", "none", "random")
# where a tower sits inside a bigger model: open_clip CLIP, VLMs, dual encoders, classifiers
_TOWER_ATTRIBUTES = ("visual", "vision_tower", "vision_model", "vit", "model")

# what build_encoder and load_encoder take: a dymu name, a local folder or a model instance
ModelSource = str | os.PathLike | nn.Module


def normalize_pretrained(pretrained: str | None) -> str | None:
    """``None``/``'none'``/``'random'`` mean random init; anything else is a tag or a path."""
    if pretrained is None or pretrained.lower() in _NO_WEIGHTS:
        return None
    return pretrained


@dataclass
class _Source:
    """A resolved model source: the tower and what the encoder records about it."""

    tower: TowerAdapter
    name: str
    pretrained: str
    preprocess: Callable | None
    r_total: int | None = None  # from a dymu name; None: keep a third of the patches
    schedule: str = "constant"


def build_encoder(
    model: ModelSource,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    r_total: int | None = None,
    schedule: str | list[int] | None = None,
    select_layer: int | None = None,
    drop_cls: bool = False,
    seed: int = 0,
    fixed_r: bool = False,
    attention: str = "auto",
) -> DyMUEncoder:
    """An encoder without thresholds (what calibration starts from).

    ``model`` is a dymu name (``'ViT-L-14-336-tome-72out'``), a local transformers folder
    (a vision model, or a VLM whose vision tower is taken), or a model instance: an open_clip
    model or tower, a transformers vision model or a VLM holding one. For names,
    ``pretrained`` is ``None`` (random init, seeded with ``seed`` so every command builds the
    same weights), an open_clip tag such as ``'openai'`` or a checkpoint path. Instances are
    used as they are (device, dtype and train/eval mode unchanged unless ``device``/``dtype``
    are given). Without ``r_total`` a name's own budget applies; folders and instances keep a
    third of the patches. With ``fixed_r`` every image merges exactly the schedule's ``r`` per
    block (ToMe mode) and needs no thresholds. ``attention`` picks how images of
    different lengths attend (:mod:`dymu.engine.attention`; the default suits the device).
    """
    source = _resolve(model, pretrained, seed, dtype, device)
    tower = source.tower
    if isinstance(tower, QwenVisionTower):
        return _qwen_encoder(source, r_total, schedule, attention, device, dtype, model)
    if r_total is None:
        r_total = source.r_total
    if r_total is None:
        r_total = tower.num_patches - tower.num_patches // 3
    elif not 0 <= r_total < tower.num_patches:  # the rule a name's -<K>out follows: keep >= 1
        raise DyMUError(
            f"r_total {r_total} would keep {tower.num_patches - r_total} of the "
            f"{tower.num_patches} patches of {source.name}; it must be 0 .. {tower.num_patches - 1}"
        )
    schedule = source.schedule if schedule is None else schedule
    r = make_schedule(r_total, tower.num_blocks, schedule)
    encoder = DyMUEncoder(
        tower,
        r,
        select_layer=select_layer,
        drop_cls=drop_cls,
        name=source.name,
        preprocess=source.preprocess,
        fixed_r=fixed_r,
        attention=attention,
    )
    return _finish(encoder, source, schedule, device, dtype, model)


def _qwen_encoder(source: _Source, r_total, schedule, attention, device, dtype, model):
    """A Qwen-VL tower's encoder: ``r_total`` merges per window (default: keep a third of
    each window's units), spread by ``schedule`` (see :mod:`dymu.encoder.qwen`)."""
    units = source.tower.window_units
    if r_total is None:
        r_total = units - units // 3
    elif not 0 <= r_total < units:
        raise DyMUError(
            f"r_total {r_total}: a {source.name} window holds {units} units, so merges per "
            f"window must be 0 .. {units - 1}"
        )
    schedule = source.schedule if schedule is None else schedule
    r = make_schedule(r_total, source.tower.num_blocks, schedule)
    encoder = QwenDyMUEncoder(source.tower, r, name=source.name, attention=attention)
    encoder.preprocess = source.preprocess or source.tower.preprocess()
    return _finish(encoder, source, schedule, device, dtype, model)


def _finish(encoder, source: _Source, schedule, device, dtype, model):
    """What every built encoder records and how it is placed: its weights' source and
    schedule name, the device/dtype asked for, eval mode unless an instance was given."""
    encoder.pretrained = source.pretrained
    if isinstance(schedule, str):
        encoder.schedule_name = schedule
    if device is not None or dtype is not None:
        encoder = encoder.to(device=device, dtype=dtype)
    return encoder if isinstance(model, nn.Module) else encoder.eval()


def load_encoder(
    model: ModelSource,
    pretrained: str | None = None,
    thresholds: str | os.PathLike | Thresholds | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> DyMUEncoder:
    """A ready-to-use DyMU encoder for a name such as ``'ViT-L-14-336-tome'``, a local
    transformers folder or a model instance (see :func:`build_encoder`).

    ``pretrained=None`` builds a name's tower with random weights (nothing is downloaded) and
    says so in a warning, once per process; pass ``'openai'`` or another tag for real weights.
    ``thresholds`` is a file, a :class:`Thresholds` or ``None`` (for dymu names: look the name
    up in the shipped ``thresholds/`` folder, then ``$DYMU_THRESHOLDS``). Thresholds made for
    another tower are refused. Folders and instances take the file's per-block ``r`` unless
    ``r_total`` or ``schedule`` is given. ``overrides`` go to :func:`build_encoder`
    (``r_total``, ``schedule``, ``select_layer``, ``drop_cls``, ``seed``, ``fixed_r``,
    ``attention``).
    """
    encoder = build_encoder(model, pretrained, device=device, dtype=dtype, **overrides)
    if pretrained is None and encoder.pretrained == "none":
        _warn_random_weights(encoder.name)
    if not encoder.merges or encoder.fixed_r:
        return encoder
    if thresholds is None:
        thresholds = _look_up(model, encoder)
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.load(Path(thresholds))
    source = str(thresholds.path) if thresholds.path is not None else "thresholds"
    given = any(overrides.get(k) is not None for k in ("r_total", "schedule"))
    if _brings_no_budget(model) and not given:
        thresholds.check_tower(encoder.identity, encoder.tower.num_blocks, source)
        encoder.r = thresholds.r.tolist()  # the schedule the file was calibrated with
        encoder.schedule_name = thresholds.metadata.get("schedule", encoder.schedule_name)
    encoder.set_thresholds(thresholds, source)
    return encoder


_warned_random: list[str] = []  # the warning below comes once per process


def _warn_random_weights(name: str) -> None:
    if _warned_random:
        return
    _warned_random.append(name)
    log.warning(
        "load_encoder(%r) without pretrained= builds random weights; pass pretrained='openai' "
        "(or another tag, or a checkpoint path) for trained ones, or 'none' to say random",
        name,
    )


def _brings_no_budget(model: ModelSource) -> bool:
    """A folder or an instance: no name says how many tokens to remove."""
    return isinstance(model, nn.Module) or Path(os.fspath(model)).is_dir()


def find_tower(model: nn.Module) -> TowerAdapter:
    """The adapted vision tower of ``model``: the model itself, or a tower inside it (an
    open_clip model's ``visual``, a VLM's ``vision_tower``, a dual encoder's
    ``vision_model``, a classifier's ``vit``), searched two levels deep."""
    level = [model]
    for _ in range(3):
        for module in level:
            if (cls := adapter_for(module)) is not None:
                return cls(module)
        level = [
            child
            for module in level
            for attr in _TOWER_ATTRIBUTES
            if isinstance(child := getattr(module, attr, None), nn.Module)
        ]
    raise DyMUError(
        f"found no vision tower dymu can read in {type(model).__module__}."
        f"{type(model).__name__}; supported towers: {supported_families()}"
    )


def _resolve(model: ModelSource, pretrained: str | None, seed: int, dtype, device) -> _Source:
    folder = not isinstance(model, nn.Module) and Path(os.fspath(model)).is_dir()
    if pretrained is not None and (folder or isinstance(model, nn.Module)):
        raise DyMUError(
            "pretrained= names open_clip weights for a dymu name; a folder or a model "
            "instance brings its own weights"
        )
    if isinstance(model, nn.Module):
        tower = find_tower(model)
        return _Source(tower, instance_name(tower.module), "unknown", None)
    text = os.fspath(model)
    if folder:
        from ..towers.hf_folder import load_vision_tower

        module, stats = load_vision_tower(text, dtype)
        tower = find_tower(module)
        if isinstance(tower, QwenVisionTower):  # the folder's own processor: dynamic resolution
            return _Source(tower, text, "local", tower.preprocess(folder=text))
        return _Source(tower, text, "local", tower.preprocess(**stats))
    if "-tome" not in text and (os.sep in text or text.startswith(".")):
        raise DyMUError(f"model folder not found: {text}")
    return _from_name(text, pretrained, seed, device)


def _from_name(name: str, pretrained: str | None, seed: int, device) -> _Source:
    spec = resolve_name(name)
    pretrained = normalize_pretrained(pretrained)
    if pretrained is not None:
        check_weights_reachable(spec.base, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with open_clip_logs():  # its root-logger lines would precede dymu's one line
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.base, pretrained=pretrained, device=device
                )
        except Exception as exc:  # open_clip raises many kinds for unreachable/unknown weights
            if pretrained is None:
                raise
            raise DyMUError(
                f"cannot load weights {pretrained!r} for {spec.base}: {_first_line(exc)}. "
                "Pass a local checkpoint path, or 'none' for random weights"
            ) from None
    tower = find_tower(model.visual)
    return _Source(tower, name, pretrained or "none", preprocess, spec.r_total, spec.schedule)


def _look_up(model: ModelSource, encoder: DyMUEncoder) -> Path:
    """The thresholds file for a dymu name (shipped folder, then ``$DYMU_THRESHOLDS``)."""
    name = encoder.name
    if isinstance(model, nn.Module) or Path(os.fspath(model)).is_dir():
        raise MissingThresholds(name)
    found = find_threshold_file(name, encoder.pretrained)
    if found is None:
        raise MissingThresholds(name, [str(p) for p in search_paths()])
    return found


def instance_name(module: nn.Module) -> str:
    """How threshold files and messages name a tower given as an instance."""
    config = getattr(module, "config", None)
    path = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return f"{type(module).__name__} {path}".strip()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
