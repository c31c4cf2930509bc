"""Which images a thresholds file has counted, so that ``merge`` can refuse overlaps.

A run covers the first ``images`` items (bad ones included) of its data's stream. The data
is named by its members: resolved local paths (a JSON list, a folder, each shard) or URLs,
so the same shard reached through two patterns is still recognised. Two covers overlap when
they share a member: both runs start at item 0, so they have counted some of the same images.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import DyMUError
from ..thresholds import Thresholds

log = logging.getLogger(__name__)

COVERS_KEY = "covers"


def data_members(spec: str) -> list[str]:
    """The members of a ``--data`` spec (shard patterns expanded, local paths resolved)."""
    from webdataset.shardlists import expand_urls  # braces and '::' lists, as the reader

    return [_resolved(name) for name in expand_urls(spec)]


def _resolved(name: str) -> str:
    if "://" in name or name.startswith(("pipe:", "hf:")):
        return name  # a URL, a command or a hub dataset: as given
    return str(Path(name).resolve())


def covers_metadata(spec: str, images: int) -> dict[str, str]:
    """Metadata for a run over ``spec`` that went through its first ``images`` items."""
    return {COVERS_KEY: json.dumps([{"data": data_members(spec), "images": images}])}


def read_covers(metadata: dict[str, str], source: str) -> list[dict] | None:
    """A file's covers, or ``None`` for files that do not record them (older, Python-made)."""
    text = metadata.get(COVERS_KEY)
    if text is None:
        return None
    try:
        covers = json.loads(text)
        return [{"data": list(c["data"]), "images": int(c["images"])} for c in covers]
    except (ValueError, KeyError, TypeError):
        raise DyMUError(f"{source}: unreadable {COVERS_KEY!r} metadata") from None


def check_disjoint(parts: list[tuple[str, list[dict]]]) -> None:
    """Refuse when two files counted some of the same images, naming both and the data."""
    seen: dict[str, str] = {}
    for name, covers in parts:
        mine = {member for cover in covers for member in cover["data"]}
        for member in sorted(mine):
            if member in seen:
                raise DyMUError(
                    f"cannot merge: {seen[member]} and {name} both counted images of {member} "
                    "(merging adds statistics of disjoint image sets only)"
                )
        seen.update(dict.fromkeys(mine, name))


def merge_files(paths: list[str | os.PathLike]) -> Thresholds:
    """Add up threshold files made on disjoint image sets (``dymu-find-thresholds merge``).

    The same file twice, or two files that counted the same images, are refused; the result
    covers all their images. Inference token counts are dropped: they were measured for each
    part's thresholds, not the merged ones.
    """
    resolved = [str(Path(p).resolve()) for p in paths]
    for i, path in enumerate(resolved):
        if path in resolved[:i]:
            raise DyMUError(f"cannot merge: {paths[i]} is given twice")
    parts = [Thresholds.load(p) for p in paths]
    covers = [read_covers(t.metadata, str(p)) for t, p in zip(parts, paths, strict=True)]
    if all(c is not None for c in covers):
        check_disjoint([(str(p), c) for p, c in zip(paths, covers, strict=True)])
    else:
        _check_not_copies(parts, paths)
        log.warning("some files do not record their images: overlap cannot be checked")
    total = parts[0]
    for part in parts[1:]:
        total = total.merge(part)
    meta = {k: v for k, v in total.metadata.items() if not k.startswith("inference_")}
    meta.pop(COVERS_KEY, None)
    if all(c is not None for c in covers):
        meta[COVERS_KEY] = json.dumps([cover for c in covers for cover in c])
    meta.pop(_MEAN, None)
    if all(_MEAN in t.metadata and "images" in t.metadata for t in parts):
        weighted = sum(float(t.metadata[_MEAN]) * int(t.metadata["images"]) for t in parts)
        meta[_MEAN] = f"{weighted / max(int(meta['images']), 1):.2f}"
    total.metadata = meta
    return total


_MEAN = "calibration_tokens_mean"  # the batch rule's tokens per image: a weighted mean


def _check_not_copies(parts: list[Thresholds], paths: list) -> None:
    """Without covers: at least refuse a copy of the same result under two names."""
    for i, a in enumerate(parts):
        for j in range(i):
            b = parts[j]
            if torch.equal(a.sum, b.sum) and torch.equal(a.count, b.count):
                raise DyMUError(f"cannot merge: {paths[j]} and {paths[i]} hold the same result")
