"""Build encoders from dymu names: open_clip model, schedule and thresholds in one place."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import open_clip
import torch

from .adapters import adapt
from .encoder import DyMUEncoder
from .errors import DyMUError
from .names import resolve_name
from .schedule import make_schedule
from .thresholds import Thresholds, find_threshold_file, search_paths

log = logging.getLogger(__name__)

_NO_WEIGHTS = ("", "none", "random")


def normalize_pretrained(pretrained: str | None) -> str | None:
    """``None``/``'none'``/``'random'`` mean random init; anything else is a tag or a path."""
    if pretrained is None or pretrained.lower() in _NO_WEIGHTS:
        return None
    return pretrained


def build_encoder(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    r_total: int | None = None,
    schedule: str | list[int] | None = None,
    select_layer: int | None = None,
    drop_cls: bool = False,
    seed: int = 0,
) -> DyMUEncoder:
    """An encoder without thresholds (what calibration starts from).

    ``pretrained`` is ``None`` (random init, seeded with ``seed`` so every command builds
    the same weights), an open_clip tag such as ``'openai'`` or a checkpoint path.
    """
    spec = resolve_name(name)
    pretrained = normalize_pretrained(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
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
    schedule = spec.schedule if schedule is None else schedule
    r = make_schedule(spec.r_total if r_total is None else r_total, spec.num_blocks, schedule)
    encoder = DyMUEncoder(
        adapt(model.visual), r, select_layer=select_layer, drop_cls=drop_cls, name=name
    )
    encoder.preprocess = preprocess
    encoder.pretrained = pretrained or "none"
    if isinstance(schedule, str):
        encoder.schedule_name = schedule
    return encoder.to(device=device, dtype=dtype).eval()


def load_encoder(
    name: str,
    pretrained: str | None = None,
    thresholds: str | os.PathLike | Thresholds | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> DyMUEncoder:
    """A ready-to-use DyMU encoder for a name such as ``'ViT-L-14-336-tome'``.

    ``thresholds`` is a file, a :class:`Thresholds` or ``None`` (look the name up in the
    shipped ``thresholds/`` folder, then ``$DYMU_THRESHOLDS``). ``overrides`` go to
    :func:`build_encoder` (``r_total``, ``schedule``, ``select_layer``, ``drop_cls``, ``seed``).
    """
    encoder = build_encoder(name, pretrained, device=device, dtype=dtype, **overrides)
    if not encoder.merges:
        return encoder
    source = "thresholds"
    if thresholds is None:
        found = find_threshold_file(name, encoder.pretrained)
        if found is None:
            folders = ", ".join(str(p) for p in search_paths())
            raise DyMUError(
                f"no thresholds for {name} (looked in {folders}). Find them with "
                f"`dymu-find-thresholds --model {name} --data images.json`, convert published "
                "ones, or pass thresholds=FILE; r_total=0 encodes without merging"
            )
        thresholds = found
    if not isinstance(thresholds, Thresholds):
        source = str(thresholds)
        thresholds = Thresholds.load(Path(thresholds))
    thresholds.check_model(name, resolve_name(name).base, encoder.tower.num_blocks, source)
    encoder.set_thresholds(thresholds)
    return encoder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
