"""Hugging Face datasets and parquet files as calibration data, one image a row, in order.

- ``hf:NAME[:SPLIT]``: ``datasets.load_dataset(NAME, split=SPLIT or "train", streaming=True)``;
  NAME is a hub id, or a local dataset folder (``hf:/data/photos``: parquet, image folder...).
  The hub's host is probed first (a few seconds at most), so an offline machine gets one line
  instead of the hub client's retries.
- a folder written by ``Dataset.save_to_disk`` (it has ``state.json``), with or without
  ``hf:`` (``hf:FOLDER:SPLIT`` for a saved ``DatasetDict``): ``load_from_disk``.
- ``x.parquet``, a glob or brace pattern of them, or a folder holding ``.parquet`` files and
  no images: read with pyarrow, only the image column, file after file in path order.

The image column (``image_column``, else the first ``datasets.Image`` feature, else a column
named image/img/jpg/...) is read undecoded, as Arrow batches: an ``Image`` value is
``{"bytes", "path"}``, a binary column gives bytes and a string column a path (relative
ones resolve against ``image_root``, else the dataset's folder). A row with no image is a bad
item in place. Rows are read with ``.iter(batch_size)``, never ``iter(dataset)``: inside a
DataLoader worker a streaming ``datasets.IterableDataset`` would give each worker only some
of its shards, while here every worker walks the whole stream (an item's batch is its
position). So each worker streams a hub dataset in full: use ``--num-workers`` 0 or 1 with
``hf:`` hub ids, or download the dataset first and point at the folder.
"""

from __future__ import annotations

import glob
import importlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from torch.utils.data import get_worker_info

from ..errors import DyMUError
from .items import IMAGE_EXTENSIONS, RawItem

log = logging.getLogger(__name__)

IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")  # after any Image feature
ROWS = 64  # rows a batch when reading the image column
PROBE_SECONDS = 5.0  # how long the hub's host may take to accept a connection
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def open_table(
    spec: str, image_root: str | Path | None = None, image_column: str | None = None
) -> HubSource | DiskSource | ParquetSource | None:
    """The dataset ``spec`` names, or None when it is none (a JSON list, images, shards)."""
    if spec.startswith("hf:") and not spec.startswith("hf://"):
        saved = _saved_folder(spec[3:])
        if saved is not None:
            return DiskSource(saved, image_column, image_root)
        return HubSource(spec[3:], image_column, image_root)
    path = Path(spec)
    if ".parquet" in spec and "://" not in spec:
        return ParquetSource(spec, _parquet_files(spec), image_column, image_root)
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DyMUError(f"{spec} holds the splits {', '.join(splits)}: give {spec}/SPLIT")
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        return DiskSource(path, image_column, image_root)
    files = _parquet_folder(path)
    return ParquetSource(spec, files, image_column, image_root) if files else None


def _saved_folder(spec: str) -> Path | None:
    """The ``save_to_disk`` folder ``hf:FOLDER[:SPLIT]`` names (a saved ``DatasetDict``: its
    SPLIT, default train), or None when it names none (a hub id, a folder of data files)."""
    name, split = (spec, None) if Path(spec).is_dir() else _name_split(spec)
    folder = Path(name)
    if (folder / "dataset_dict.json").is_file():
        split = split or "train"
        if not (folder / split / "state.json").is_file():
            splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
            raise DyMUError(f"hf:{spec}: {folder} has no split {split!r} ({', '.join(splits)})")
        return folder / split
    if not (folder / "state.json").is_file():
        return None
    if split is not None:
        raise DyMUError(f"hf:{spec}: {folder} holds one dataset, no splits: give hf:{folder}")
    return folder


def _probe_hub(spec: str) -> None:
    """Refuse in one line, within seconds, a hub dataset whose host cannot be reached (the
    hub client would retry for half a minute). Offline mode and proxies are left to it."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    if _offline() or url.hostname is None or any(map(os.environ.get, _PROXIES)):
        return
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DyMUError(
            f"cannot load hf:{spec}: {url.hostname} is unreachable ({reason}); {_LOCAL_COPY}"
        ) from None


_LOCAL_COPY = (
    "set HF_HUB_OFFLINE=1 to use a cached copy, or give a local one (a save_to_disk folder or "
    "parquet files)"
)


def _items(prefix: str, batches: Iterable[Any], root: Path | None) -> Iterator[RawItem]:
    """Items ``<prefix>#<row>`` from Arrow batches of the image column."""
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            yield _item(f"{prefix}#{row}", value, root)
            row += 1


def _item(key: str, value: Any, root: Path | None) -> RawItem:
    """An image cell, undecoded: ``{"bytes", "path"}`` (an ``Image``), bytes or a path."""
    data, path = value, None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, str):
        data, path = None, value
    if data is not None and not isinstance(data, bytes | bytearray):
        return RawItem(key, error=f"not an image: a {type(data).__name__} in the image column")
    if data:
        return RawItem(key, data=bytes(data))
    if path:
        return RawItem(key, path=root / path if root is not None else Path(path))
    return RawItem(key, error="no image")


class HubSource:
    """``hf:NAME[:SPLIT]``: a dataset streamed by ``datasets.load_dataset`` (no length)."""

    def __init__(
        self, spec: str, image_column: str | None, image_root: str | Path | None = None
    ) -> None:
        datasets = _need("datasets", f"hf:{spec}")
        name, split = _name_split(spec)
        ds = _stream(datasets, spec, name, split)
        features = ds.features or {}
        columns = list(features) or ([image_column] if image_column else [])
        images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        self.name = f"hf:{name}:{split}"
        self.column = _choose(self.name, columns, images, image_column)
        self.root = Path(image_root) if image_root is not None else None
        self.dataset = ds.select_columns([self.column]).with_format("arrow")

    def __iter__(self) -> Iterator[RawItem]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1 and info.id == 0:
            log.warning(
                "each of the %d DataLoader workers streams all of %s", info.num_workers, self.name
            )
        return _items(self.name, self.dataset.iter(batch_size=ROWS), self.root)


class DiskSource:
    """A folder written by ``Dataset.save_to_disk`` (memory-mapped, so every worker reads it)."""

    def __init__(
        self, folder: Path, image_column: str | None, image_root: str | Path | None = None
    ) -> None:
        datasets = _need("datasets", str(folder))
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as exc:  # a damaged or foreign folder
            raise DyMUError(f"cannot load the dataset in {folder}: {_first_line(exc)}") from None
        images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        self.name = str(folder)
        self.column = _choose(self.name, list(ds.features), images, image_column)
        self.root = Path(image_root) if image_root is not None else folder
        self.dataset = ds.select_columns([self.column]).with_format("arrow")

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[RawItem]:
        return _items(self.name, self.dataset.iter(batch_size=ROWS), self.root)


class ParquetSource:
    """Parquet files read with pyarrow, only the image column (``key``: ``<file>#<row>``)."""

    def __init__(
        self,
        spec: str,
        files: list[Path],
        image_column: str | None,
        image_root: str | Path | None = None,
    ) -> None:
        self.files = files
        pq = _need("pyarrow.parquet", spec)
        try:
            schema = pq.read_schema(files[0])
        except Exception as exc:  # pyarrow's own error types
            raise DyMUError(f"cannot read {files[0]}: {_first_line(exc)}") from None
        self.name = spec
        self.column = _choose(str(files[0]), schema.names, _image_features(schema), image_column)
        self.root = Path(image_root) if image_root is not None else None

    def __len__(self) -> int:
        pq = _need("pyarrow.parquet", self.name)
        return sum(_rows(pq, f) for f in self.files)

    def __iter__(self) -> Iterator[RawItem]:
        pq = _need("pyarrow.parquet", self.name)  # a module: not kept, so workers can pickle us
        for file in self.files:
            root = self.root if self.root is not None else file.parent
            try:
                batches = pq.ParquetFile(file).iter_batches(ROWS, columns=[self.column])
                yield from _items(str(file), batches, root)
            except Exception as exc:  # pyarrow's own types: a broken file, a missing column
                yield RawItem(str(file), error=f"broken parquet file: {_first_line(exc)}")


def _offline() -> bool:
    """Offline as datasets sees it (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE``)."""
    from datasets import config

    return bool(config.HF_HUB_OFFLINE)


def _stream(datasets: Any, spec: str, name: str, split: str) -> Any:
    """``load_dataset(streaming=True)``; a hub id is probed first, failures are one line."""
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.exists():  # a path, never a hub id
        raise DyMUError(f"cannot load hf:{spec}: no such folder or file: {path}")
    local = path.exists()
    if not local:
        _probe_hub(spec)
    try:
        return datasets.load_dataset(str(path) if local else name, split=split, streaming=True)
    except Exception as exc:  # not found, offline, bad split...: datasets' own types
        advice = ""
        if _offline() and not local:
            advice = (
                "; HF_HUB_OFFLINE is set and it is not cached: give a local copy (a "
                "save_to_disk folder or parquet files)"
            )
        raise DyMUError(f"cannot load hf:{spec}: {_first_line(exc)}{advice}") from None


def _need(module: str, what: str) -> Any:
    """Import an optional dependency, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DyMUError(f"reading {what} needs {package}: pip install 'dymu[data]'") from None


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _name_split(spec: str) -> tuple[str, str]:
    """``NAME[:SPLIT]`` -> (NAME, SPLIT or "train"); a colon inside a path stays in NAME."""
    name, sep, split = spec.rpartition(":")
    if sep and name and split.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return name, split
    return spec, "train"


def _choose(where: str, columns: list[str], images: list[str], wanted: str | None) -> str:
    """The image column: ``wanted``, else the first ``Image`` feature, else a usual name."""
    if wanted is not None:
        if columns and wanted not in columns:
            raise DyMUError(f"{where} has no column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    if images:
        return images[0]
    lower = {c.lower(): c for c in reversed(columns)}
    for name in IMAGE_NAMES:
        if name in lower:
            return lower[name]
    listed = ", ".join(columns) if columns else "not known before reading"
    raise DyMUError(
        f"{where}: no image column found (columns: {listed}); name it with --image-column"
    )


def _image_features(schema: Any) -> list[str]:
    """Columns a parquet file's Hugging Face metadata declares ``Image``."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(meta)["info"]["features"] if meta else {}
    except (ValueError, KeyError, TypeError):
        return []
    return [
        c
        for c in schema.names
        if isinstance(features.get(c), dict) and features[c].get("_type") == "Image"
    ]


def _rows(pq: Any, file: Path) -> int:
    try:
        return pq.ParquetFile(file).metadata.num_rows
    except Exception:  # a broken file is reported when read; it counts no rows
        return 0


def _parquet_files(spec: str) -> list[Path]:
    """A parquet file, or the files a glob or brace pattern names, sorted."""
    from webdataset.shardlists import expand_urls

    files: list[Path] = []
    for pattern in expand_urls(spec):
        if any(c in pattern for c in "*?["):
            files += sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        elif Path(pattern).is_dir():  # e.g. Spark's x.parquet/part-*.parquet
            files += _parquet_folder(Path(pattern))
        elif Path(pattern).is_file():
            files.append(Path(pattern))
    if not files:
        raise DyMUError(f"no parquet files match {spec}")
    return files


def _parquet_folder(folder: Path) -> list[Path]:
    """The parquet files under a folder, sorted; none when it holds images (an image folder)."""
    files = []
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS:
            return []
        if suffix == ".parquet" and path.is_file():
            files.append(path)
    return sorted(files)
