"""What a calibration run keeps so that no work is lost: progress marks and ``OUT.partial``.

A run's :class:`Progress` is marked after every counted batch; a checkpoint always holds the
last mark, so an interruption at any instant (Ctrl-C, SIGTERM, an error mid-batch) saves a
consistent state, and ``--resume`` continues right after the last counted batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .calibrate import CalibrationState, TokenStats
from .errors import DyMUError
from .thresholds import atomic_save

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
        )
        atomic_save({"sum": mark.sum.cpu(), "count": mark.count.cpu()}, path, meta)
        return True

    def load(self, path: Path, identity: dict[str, str]) -> None:
        """Continue from a checkpoint made by the same settings (``RESUME_KEYS``)."""
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
        except Exception as exc:  # any unreadable checkpoint gets the same one-line answer
            raise DyMUError(f"cannot resume from {path}: {exc}") from None
        if meta.get("format") != PARTIAL_FORMAT:
            raise DyMUError(f"cannot resume from {path}: not a dymu checkpoint")
        for key in RESUME_KEYS:
            if meta.get(key) != identity[key]:
                raise DyMUError(
                    f"cannot resume from {path}: {key} was {meta.get(key)!r}, now {identity[key]!r}"
                )
        c = self.calibration
        c.sum += tensors["sum"].to(c.sum.device)
        c.count += tensors["count"].to(c.count.device)
        c.tokens = TokenStats(**json.loads(meta["tokens"]))
        self.skipped = json.loads(meta["skipped"])
        self.next_batch = int(meta["next_batch"])
        self.mark()


def partial_path(out: Path, rank: int, world: int) -> Path:
    """``OUT.partial`` (one process) or ``OUT.partial.rank<r>`` (torchrun)."""
    suffix = ".partial" if world == 1 else f".partial.rank{rank}"
    return out.with_name(out.name + suffix)
