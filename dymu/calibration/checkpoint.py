"""What a calibration run keeps so that no work is lost: progress marks and ``OUT.partial``.

A run's :class:`Progress` is marked after every counted batch; a checkpoint always holds the
last mark, so an interruption at any instant (Ctrl-C, SIGTERM, an error mid-batch) saves a
consistent state, and ``--resume`` continues right after the last counted batch. While a
run goes, it holds ``OUT.lock`` (:func:`run_lock`), so a second run on the same ``--out``
refuses instead of overwriting its progress.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import DyMUError
from ..thresholds import atomic_save
from .loop import CalibrationState, TokenStats

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "dymu-partial/1"
# settings a resumed run must share with the interrupted one
RESUME_KEYS = (
    "model",
    "pretrained",
    "data",
    "batch_size",
    "r",
    "max_images",
    "shuffle_seed",
    "dtype",
    "world_size",
    "image_column",
    "tower_arch",
    "tower_weights",
)


@dataclass
class _Mark:
    sum: torch.Tensor
    count: torch.Tensor
    tokens: TokenStats
    skipped: int
    next_batch: int


@dataclass
class Progress:
    """A process's statistics, skipped images and position (the next batch it has not counted)."""

    calibration: CalibrationState
    skipped: list[dict] = field(default_factory=list)
    next_batch: int = 0
    last: _Mark | None = None  # the last consistent instant
    earlier: float = 0.0  # seconds spent before this process started (interrupted runs)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds of the whole run: this process's and those of the runs it resumes."""
        return self.earlier + time.perf_counter() - self.started

    def mark(self) -> None:
        """Remember this instant as consistent (after a batch is fully counted)."""
        c = self.calibration
        self.last = _Mark(
            c.sum.clone(), c.count.clone(), replace(c.tokens), len(self.skipped), self.next_batch
        )

    def save(self, path: Path, identity: dict[str, str]) -> bool:
        """Write the last mark to ``path``; ``False`` when there was nothing to keep."""
        mark = self.last
        if mark is None:
            return False
        meta = dict(
            identity,
            format=PARTIAL_FORMAT,
            next_batch=str(mark.next_batch),
            tokens=json.dumps(asdict(mark.tokens)),
            skipped=json.dumps(self.skipped[: mark.skipped]),
            seconds=f"{self.elapsed():.3f}",
        )
        atomic_save({"sum": mark.sum.cpu(), "count": mark.count.cpu()}, path, meta)
        return True

    def load(self, path: Path, identity: dict[str, str]) -> None:
        """Continue from a checkpoint made by the same settings (``RESUME_KEYS``)."""
        tensors, meta = _read(path)
        if meta.get("format") != PARTIAL_FORMAT:
            raise DyMUError(f"cannot resume from {path}: not a dymu checkpoint")
        for key in RESUME_KEYS:
            if meta.get(key) != identity[key]:
                raise DyMUError(
                    f"cannot resume from {path}: {key} was {meta.get(key)!r}, now {identity[key]!r}"
                )
        c = self.calibration
        try:
            c.sum += tensors["sum"].to(c.sum.device)
            c.count += tensors["count"].to(c.count.device)
            c.tokens = TokenStats(**json.loads(meta["tokens"]))
            self.skipped = json.loads(meta["skipped"])
            self.next_batch = int(meta["next_batch"])
            self.earlier = float(meta.get("seconds", 0.0))  # older checkpoints lack it
        except Exception as exc:  # missing or malformed entries: as damaged as unreadable
            raise DyMUError(_damaged(path, exc)) from None
        self.mark()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's tensors and metadata; a damaged file is one line saying what to do."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            return tensors, dict(fh.metadata() or {})
    except Exception as exc:  # truncated, overwritten, not safetensors: all the same answer
        raise DyMUError(_damaged(path, exc)) from None


def _damaged(path: Path, exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return (
        f"cannot resume from {path}: the checkpoint is damaged ({reason}); delete it to start "
        "from the beginning (its progress is lost)"
    )


def partial_path(out: Path, rank: int, world: int) -> Path:
    """``OUT.partial`` (one process) or ``OUT.partial.rank<r>`` (torchrun)."""
    suffix = ".partial" if world == 1 else f".partial.rank{rank}"
    return out.with_name(out.name + suffix)


def lock_path(out: Path, rank: int = 0) -> Path:
    """``OUT.lock`` (one process, or rank 0 under torchrun, which writes ``OUT``) or
    ``OUT.rank<r>.lock`` (the other torchrun ranks, one a partial)."""
    return out.with_name(out.name + (".lock" if rank == 0 else f".rank{rank}.lock"))


@contextmanager
def run_lock(out: Path, rank: int = 0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on :func:`lock_path` for a whole run: a second run writing
    the same ``--out`` (and its partials) refuses in one line naming the holder. The system
    drops the lock of a killed run, so a lock file left behind never blocks anyone."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded
        yield
        return
    path = lock_path(out, rank)
    handle = _acquire(path, fcntl, out)
    try:
        yield
    finally:
        if handle is not None:
            path.unlink(missing_ok=True)  # still held: whoever opened it before sees a stale file
            handle.close()


def _acquire(path: Path, fcntl, out: Path) -> IO[str] | None:
    """The open, locked lock file with this process named in it (None: no locks here)."""
    for _ in range(10):  # retried only when the file was replaced while we locked it
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "holder unknown"
            handle.close()
            raise DyMUError(
                f"another run is writing {out} ({holder}; it holds {path}): wait for it to "
                "end, or give another --out"
            ) from None
        except OSError as exc:  # e.g. a file system without locks
            handle.close()
            log.warning("cannot lock %s (%s): runs on this --out are not guarded", path, exc)
            return None
        if _same_file(handle, path):
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            return handle
        handle.close()
    raise DyMUError(f"cannot lock {path}: it keeps being replaced")


def _same_file(handle: IO[str], path: Path) -> bool:
    """Whether ``path`` still names the file ``handle`` holds (a releasing run removes it)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
