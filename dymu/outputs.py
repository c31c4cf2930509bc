"""Output locations checked before any work starts, so a long run never ends unable to write."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import DyMUError


def check_output(out: Path, flag: str = "--out") -> None:
    """Refuse an output file that cannot be written: a folder, or a folder that cannot be
    made or written to (probed with a temporary file: permissions, read-only mounts, a file
    where a folder should be, all answer the same way)."""
    if out.is_dir():
        raise DyMUError(f"{flag} {out} is a folder: give a file name, such as {out}/x.safetensors")
    _probe(out.parent if str(out.parent) else Path("."), f"{flag} {out}")


def check_folder(folder: Path, flag: str) -> None:
    """Refuse an output folder that is a file, or cannot be made or written to."""
    if folder.exists() and not folder.is_dir():
        raise DyMUError(f"{flag} {folder} is a file: give a folder for the pictures")
    _probe(folder, f"{flag} {folder}")


def _probe(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise DyMUError(f"cannot write {what}: {folder}: {reason}") from None
