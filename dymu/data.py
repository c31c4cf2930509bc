"""Image sources for calibration: a JSON list of ``{"image": path}`` entries."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from .errors import DyMUError


def read_image_list(path: str | Path, image_root: str | Path | None = None) -> list[Path]:
    """Paths from a JSON list of ``{"image": "relative/path.jpg", ...}`` (other keys ignored).

    Relative paths resolve against ``image_root`` (default: the JSON's folder). Every entry
    is checked up front, so a bad list fails before any model work.
    """
    path = Path(path)
    if not path.is_file():
        raise DyMUError(f"data file not found: {path}")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DyMUError(f"{path} is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise DyMUError(f"{path} is not a JSON text file") from None
    if not isinstance(entries, list):
        raise DyMUError(
            f'{path} must hold a JSON list of {{"image": ...}} entries, '
            f"not a {type(entries).__name__}"
        )
    if not entries:
        raise DyMUError(f"{path} lists no images")
    root = Path(image_root) if image_root is not None else path.parent
    paths = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DyMUError(f'{path}: entry {i} has no "image" path: {json.dumps(entry)[:80]}')
        image = root / entry["image"]
        if not image.is_file():
            raise DyMUError(f"{path}: entry {i}: image not found: {image}")
        paths.append(image)
    return paths


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB (grayscale, palette and alpha images are converted)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DyMUError(f"cannot read image {path}: {exc}") from None


class ImageFiles(Dataset):
    """Preprocessed images from a list of paths; errors come back as values, not exceptions.

    Returning ``(None, message)`` keeps worker tracebacks out of the user's terminal and lets
    the caller decide what a bad image means.
    """

    def __init__(self, paths: list[Path], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.preprocess(load_rgb(self.paths[index])), None
        except DyMUError as exc:
            return None, str(exc)


def _collate(items: list[tuple[torch.Tensor | None, str | None]]):
    return items


def iterate_batches(
    paths: list[Path],
    preprocess: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[torch.Tensor]:
    """Batches of preprocessed images in list order; decoding runs in ``num_workers`` workers.

    A file that cannot be decoded ends the run with a :class:`DyMUError` naming it.
    """
    loader = DataLoader(
        ImageFiles(paths, preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    for items in loader:
        for _, error in items:
            if error is not None:
                raise DyMUError(error)
        yield torch.stack([pixels for pixels, _ in items])
