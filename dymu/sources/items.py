"""What every image source yields, shared by all of them: an undecoded item and the file
extensions read as images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class RawItem:
    """One image before decoding: a file, or bytes from a shard (``key`` names it in reports)."""

    key: str
    path: Path | None = None
    data: bytes | None = None
    error: str | None = None  # known bad before decoding (e.g. a shard sample with no image)
    span: tuple[int, int] | None = None  # (offset, size) of the bytes inside ``path`` (a tar)

    def read(self) -> bytes:
        """The encoded image bytes (read from the tar only now, by whoever decodes it)."""
        if self.span is None:
            return self.data or b""
        offset, size = self.span
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
