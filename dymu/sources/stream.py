"""Image sources for calibration: JSON lists, folders, webdataset shards
(:mod:`dymu.sources.shards`) and Hugging Face datasets (:mod:`dymu.sources.hf`), streamed in
order.

Every source yields :class:`RawItem` s in a fixed order; item ``i`` belongs to global batch
``i // batch_size``. A bad item is reported in place (its batch just gets smaller), so skips
never shift which images form the other batches.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..defaults import DEFAULT_MAX_PIXELS
from ..errors import DyMUError
from .items import IMAGE_EXTENSIONS, RawItem


class FileList:
    """A source that is a known list of image files."""

    paths: list[Path]

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[RawItem]:
        return (RawItem(str(p), path=p) for p in self.paths)


class JsonSource(FileList):
    """A JSON list of ``{"image": "relative/path.jpg", ...}`` (other keys ignored)."""

    def __init__(self, path: Path, image_root: str | Path | None = None) -> None:
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
        self.paths = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise DyMUError(f'{path}: entry {i} has no "image" path: {json.dumps(entry)[:80]}')
            self.paths.append(root / entry["image"])


class FolderSource(FileList):
    """Every image file under a folder, recursively, in sorted path order."""

    def __init__(self, root: Path) -> None:
        self.paths = sorted(
            p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.paths:
            kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
            raise DyMUError(f"no images in {root} (looked for {kinds} files, recursively)")


def open_source(
    spec: str, image_root: str | Path | None = None, image_column: str | None = None
) -> Iterable[RawItem]:
    """A JSON list file, a folder of images, webdataset shards (local, ``pipe:CMD`` or URLs),
    or a Hugging Face dataset (``hf:NAME[:SPLIT]``, a ``save_to_disk`` folder, parquet files).

    ``image_column`` names the image column of a dataset (default: found from its features).
    Sources of known length also have ``len()``.
    """
    from .hf import open_table
    from .shards import ShardSource, is_remote

    table = open_table(spec, image_root, image_column)
    if table is not None:
        return table
    if image_column is not None:
        raise DyMUError(
            f"--image-column is for Hugging Face datasets and parquet files, not {spec}"
        )
    path = Path(spec)
    if ".tar" in spec or "{" in spec or is_remote(spec):
        return ShardSource(spec)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return JsonSource(path, image_root)
    raise DyMUError(f"data not found: {spec} (give a JSON list, a folder, tar shards or a dataset)")


def load_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image file as RGB; raises :class:`DyMUError` naming what is wrong."""
    image, reason = _open(RawItem(str(path), path=Path(path)), max_pixels)
    if image is None:
        raise DyMUError(f"cannot read image {path}: {reason}")
    return image


def _open(
    item: RawItem, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image | None, str | None]:
    """Decode and convert to RGB, or say why not (missing, empty, too large, truncated, ...)."""
    if item.error is not None:
        return None, item.error
    try:
        if item.path is not None and item.span is None:
            if not item.path.is_file():
                return None, "missing file"
            if item.path.stat().st_size == 0:
                return None, "empty file"
            source = item.path
        else:
            data = item.read()
            if not data:
                return None, "empty file"
            source = io.BytesIO(data)
        with _pixel_cap(max_pixels), Image.open(source) as img:
            pixels = img.width * img.height  # from the header: nothing decoded yet
            if max_pixels is not None and pixels > max_pixels:
                return None, f"too large: {_megapixels(pixels)} (over --max-pixels {max_pixels})"
            img.load()
            return to_rgb(img), None
    except UnidentifiedImageError:
        return None, "not an image"
    except Image.DecompressionBombError as exc:  # a format that only knows its size late
        return None, f"too large: {exc}"
    except OSError as exc:
        text = str(exc)
        return None, "truncated" if "truncated" in text else f"undecodable: {text}"
    except (ValueError, SyntaxError) as exc:  # PIL raises these for some corrupt files
        return None, f"undecodable: {exc}"
    except DyMUError as exc:
        return None, str(exc)


@contextmanager
def _pixel_cap(max_pixels: int | None) -> Iterator[None]:
    """Let our cap, not PIL's global bomb limit, decide (it is checked right after opening).

    PIL refuses images over twice ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open`` (and warns
    above it), whatever the caller wants; the limit is lifted for the one open and restored.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} megapixels" if pixels >= 1e6 else f"{pixels} pixels"


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from the usual modes: grayscale, palette (with transparency), RGBA, CMYK, 16-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray((arr / scale * 255).clip(0, 255).astype(np.uint8))
    elif img.mode == "F":
        raise DyMUError("unsupported mode F (floating-point image)")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


@dataclass
class Item:
    """A decoded stream item: ``pixels`` is ``None`` when it was skipped (``reason`` says why)."""

    index: int
    key: str
    pixels: torch.Tensor | dict[str, torch.Tensor] | None  # what the preprocess gives
    reason: str | None


class ImageStream(IterableDataset):
    """Decode and preprocess the items a process keeps, split over DataLoader workers.

    ``keep(index)`` selects this process's share (resume position, rank). Worker ``w`` of
    ``W`` takes every ``W``-th kept item; DataLoader's round-robin then returns them in
    stream order. An optional shuffle buffer (seeded) reorders the stream identically in
    every worker and process.
    """

    def __init__(
        self,
        source,
        preprocess: Callable[[Image.Image], torch.Tensor | dict[str, torch.Tensor]],
        keep: Callable[[int], bool] | None = None,
        max_images: int | None = None,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 1000,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.source = source
        self.max_pixels = max_pixels
        self.preprocess = preprocess
        self.keep = keep or _keep_all
        self.max_images = max_images
        self.shuffle_seed = shuffle_seed
        self.shuffle_buffer = shuffle_buffer

    def ordered(self) -> Iterator[RawItem]:
        items = iter(self.source)
        if self.shuffle_seed is not None:
            items = _shuffled(items, self.shuffle_buffer, self.shuffle_seed)
        for index, item in enumerate(items):
            if self.max_images is not None and index >= self.max_images:
                return
            yield item

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        kept = 0
        for index, raw in enumerate(self.ordered()):
            if not self.keep(index):
                continue
            if kept % workers == worker:
                image, reason = _open(raw, self.max_pixels)
                pixels = self.preprocess(image) if image is not None else None
                yield Item(index, raw.key, pixels, reason)
            kept += 1


def _keep_all(index: int) -> bool:
    return True


def _shuffled(items: Iterator[RawItem], size: int, seed: int) -> Iterator[RawItem]:
    rng = random.Random(seed)
    buffer: list[RawItem] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class Batch:
    """One global batch: the images that decoded, and the ones skipped."""

    index: int
    pixels: torch.Tensor | dict[str, torch.Tensor] | None
    skipped: list[Item]

    @property
    def size(self) -> int:
        """Images in the batch (for flat patch runs: rows of their grid)."""
        if self.pixels is None:
            return 0
        if torch.is_tensor(self.pixels):
            return self.pixels.shape[0]
        grids = [v for k, v in self.pixels.items() if k.endswith("grid_thw")]
        return (grids or list(self.pixels.values()))[0].shape[0]


def iterate_batches(stream: ImageStream, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """Group a stream's items into global batches (``index // batch_size``), in order."""
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    current, good, bad = None, [], []
    for item in loader:
        number = item.index // batch_size
        if current is not None and number != current:
            yield _batch(current, good, bad)
            good, bad = [], []
        current = number
        (good if item.pixels is not None else bad).append(item)
    if current is not None:
        yield _batch(current, good, bad)


def _identity(item: Item) -> Item:
    return item


def _batch(number: int, good: list[Item], bad: list[Item]) -> Batch:
    return Batch(number, stack_inputs([i.pixels for i in good]) if good else None, bad)


def stack_inputs(
    items: list[torch.Tensor | dict[str, torch.Tensor]],
) -> torch.Tensor | dict[str, torch.Tensor]:
    """One batch from per-image inputs: pixel tensors, or dicts of tensors (SigLIP2). Dicts
    with a ``*grid_thw`` entry (Qwen-VL) hold flat runs of patches of any length: those are
    concatenated, as the model's processor batches them."""
    if torch.is_tensor(items[0]):
        return torch.stack(items)
    join = torch.cat if any(key.endswith("grid_thw") for key in items[0]) else torch.stack
    return {key: join([item[key] for item in items]) for key in items[0]}
