"""A threshold-finding run at scale: streaming, skip report, checkpoints, resume, torchrun.

Batches are numbered in stream order; with ``WORLD_SIZE > 1`` (torchrun) rank ``r`` takes
the batches whose number is ``r`` modulo the world size, and sums and counts are
all-reduced once at the end, so the result is that of one process over the same batches.
Each process checkpoints its own statistics and position (``OUT.partial``, or
``OUT.partial.rank<r>`` under torchrun); ``resume`` continues from there.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from . import __version__
from .calibrate import RunningThresholds
from .data import Batch, ImageStream, iterate_batches, open_source
from .errors import DyMUError
from .factory import build_encoder
from .thresholds import Thresholds, atomic_save

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "dymu-partial/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# settings a resumed run must share with the interrupted one
_RESUME_KEYS = (
    "model",
    "pretrained",
    "data",
    "batch_size",
    "r",
    "max_images",
    "shuffle_seed",
    "dtype",
    "world_size",
)


@dataclass
class CalibrationConfig:
    """Everything ``dymu-find-thresholds`` takes (see its ``--help``)."""

    data: str
    model: str = "ViT-L-14-336-tome"
    pretrained: str | None = "openai"
    out: str | None = None
    r_total: int | None = None
    schedule: str | list[int] | None = None
    batch_size: int = 32
    num_workers: int = 0
    device: str | None = None
    dtype: str = "fp32"
    image_root: str | None = None
    max_images: int | None = None
    shuffle_seed: int | None = None
    strict: bool = False
    checkpoint_every: int = 100
    resume: bool = False

    @property
    def out_path(self) -> Path:
        return Path(self.out or f"{self.model}.safetensors")


@dataclass
class TokenStats:
    """Running mean/min/max of tokens per image (flat memory, however many images)."""

    total: int = 0
    images: int = 0
    low: int = 1 << 62
    high: int = 0

    def add(self, lengths: torch.Tensor) -> None:
        values = lengths.tolist()
        self.total += sum(values)
        self.images += len(values)
        self.low = min([self.low, *values])
        self.high = max([self.high, *values])

    @property
    def mean(self) -> float:
        return self.total / max(self.images, 1)


@dataclass
class CalibrationResult:
    thresholds: Thresholds
    tokens: TokenStats
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    num_tokens: int = 0


@dataclass
class _State:
    stats: RunningThresholds
    tokens: TokenStats
    skipped: list[dict]
    next_batch: int = 0


def run_calibration(
    cfg: CalibrationConfig,
    on_batch: Callable[[Batch, TokenStats], None] | None = None,
    on_start: Callable[[int | None], None] | None = None,
) -> CalibrationResult:
    """Find thresholds as configured; only rank 0 writes files. Ctrl-C leaves a checkpoint.

    ``on_start(total)`` runs once the data and model are ready (``total``: images this
    process will see, when known); ``on_batch`` after every batch.
    """
    if cfg.batch_size < 1:
        raise DyMUError("--batch-size must be at least 1")
    if cfg.dtype not in DTYPES:
        raise DyMUError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    device = _device(cfg.device)
    rank, world, owned = _init_distributed(device)
    try:
        return _run(cfg, device, rank, world, on_batch, on_start)
    finally:
        if owned:  # every rank leaves together, after rank 0 has written its files
            dist.destroy_process_group()


def _run(
    cfg: CalibrationConfig,
    device: str,
    rank: int,
    world: int,
    on_batch: Callable[[Batch, TokenStats], None] | None,
    on_start: Callable[[int | None], None] | None,
) -> CalibrationResult:
    source = open_source(cfg.data, cfg.image_root)
    encoder = build_encoder(
        cfg.model,
        cfg.pretrained,
        device=device,
        dtype=DTYPES[cfg.dtype],
        r_total=cfg.r_total,
        schedule=cfg.schedule,
    )
    num_blocks = encoder.tower.num_blocks
    identity = {
        "model": cfg.model,
        "pretrained": encoder.pretrained,
        "data": cfg.data,
        "batch_size": str(cfg.batch_size),
        "r": ",".join(map(str, encoder.r)),
        "max_images": str(cfg.max_images),
        "shuffle_seed": str(cfg.shuffle_seed),
        "dtype": cfg.dtype,
        "world_size": str(world),
    }
    partial = _partial_path(cfg.out_path, rank, world)
    state = _State(RunningThresholds(num_blocks, device), TokenStats(), [])
    if partial.exists() and not cfg.resume:
        raise DyMUError(
            f"{partial} holds an interrupted run: pass --resume to continue it, "
            "or delete it to start over"
        )
    if cfg.resume and partial.exists():
        _load_partial(partial, state, identity)
        log.warning("resuming from %s at batch %d", partial, state.next_batch)

    def keep(index: int) -> bool:
        number = index // cfg.batch_size
        return number >= state.next_batch and number % world == rank

    stream = ImageStream(source, encoder.preprocess, keep, cfg.max_images, cfg.shuffle_seed)
    if on_start is not None:
        on_start(_expected_images(source, cfg, state.next_batch, rank, world))
    start, done = time.perf_counter(), 0
    try:
        with torch.inference_mode():
            for batch in iterate_batches(stream, cfg.batch_size, cfg.num_workers):
                for item in batch.skipped:
                    if cfg.strict:
                        raise DyMUError(f"bad image {item.key}: {item.reason} (--strict)")
                    state.skipped.append(
                        {"index": item.index, "key": item.key, "reason": item.reason}
                    )
                if batch.pixels is not None:
                    out, values, used = encoder.calibrate(batch.pixels)
                    state.stats.add(values, used, batch.size)
                    state.tokens.add(out.lengths)
                state.next_batch = batch.index + 1
                done += 1
                if on_batch is not None:
                    on_batch(batch, state.tokens)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    _save_partial(partial, state, identity)
    except KeyboardInterrupt:
        _save_partial(partial, state, identity)
        raise
    stats, tokens, skipped = _reduce(state, world)
    if tokens.images == 0:
        example = f"; first: {skipped[0]['key']}: {skipped[0]['reason']}" if skipped else ""
        raise DyMUError(f"no usable images in {cfg.data} ({len(skipped)} skipped{example})")
    meta = {
        "model": cfg.model,
        "pretrained": encoder.pretrained,
        "r_total": str(sum(encoder.r)),
        "schedule": encoder.schedule_name,
        "batch_size": str(cfg.batch_size),
        "images": str(tokens.images),
        "dymu_version": __version__,
        "dtype": cfg.dtype,
    }
    result = Thresholds(stats.sum.cpu(), stats.count.cpu(), torch.tensor(encoder.r), meta)
    if rank == 0:
        result.save(cfg.out_path)
        _write_skipped(cfg.out_path, skipped)
    partial.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()  # no rank returns before the result is on disk
    return CalibrationResult(
        result, tokens, skipped, time.perf_counter() - start, encoder.tower.num_tokens
    )


def _expected_images(
    source, cfg: CalibrationConfig, first: int, rank: int, world: int
) -> int | None:
    """How many images this process will see (None for streams of unknown length)."""
    if not hasattr(source, "__len__"):
        return None
    total = len(source) if cfg.max_images is None else min(len(source), cfg.max_images)
    size = cfg.batch_size
    batches = range(first, -(-total // size))
    return sum(min(size, total - b * size) for b in batches if b % world == rank)


def _init_distributed(device: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group and must end it).

    NCCL when this process computes on a GPU (bound to it, so collectives and the final
    barrier use that GPU), gloo on CPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    return 0, 1, False


def _device(name: str | None) -> str:
    """The device asked for; a bare ``cuda`` (or none, with a GPU) means this rank's GPU."""
    if name and name != "cuda":
        return name
    if name == "cuda" or torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def _partial_path(out: Path, rank: int, world: int) -> Path:
    suffix = ".partial" if world == 1 else f".partial.rank{rank}"
    return out.with_name(out.name + suffix)


def _save_partial(path: Path, state: _State, identity: dict[str, str]) -> None:
    meta = dict(
        identity,
        format=PARTIAL_FORMAT,
        next_batch=str(state.next_batch),
        tokens=json.dumps(asdict(state.tokens)),
        skipped=json.dumps(state.skipped),
    )
    tensors = {"sum": state.stats.sum.cpu(), "count": state.stats.count.cpu()}
    atomic_save(tensors, path, meta)


def _load_partial(path: Path, state: _State, identity: dict[str, str]) -> None:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:  # any unreadable checkpoint gets the same one-line answer
        raise DyMUError(f"cannot resume from {path}: {exc}") from None
    if meta.get("format") != PARTIAL_FORMAT:
        raise DyMUError(f"cannot resume from {path}: not a dymu checkpoint")
    for key in _RESUME_KEYS:
        if meta.get(key) != identity[key]:
            raise DyMUError(
                f"cannot resume from {path}: {key} was {meta.get(key)!r}, now {identity[key]!r}"
            )
    state.stats.sum += tensors["sum"].to(state.stats.sum.device)
    state.stats.count += tensors["count"].to(state.stats.count.device)
    state.tokens = TokenStats(**json.loads(meta["tokens"]))
    state.skipped = json.loads(meta["skipped"])
    state.next_batch = int(meta["next_batch"])


def _reduce(state: _State, world: int) -> tuple[RunningThresholds, TokenStats, list[dict]]:
    """Add up every rank's statistics (once, at the end)."""
    stats, tokens, skipped = state.stats, state.tokens, state.skipped
    if world == 1:
        return stats, tokens, sorted(skipped, key=lambda s: s["index"])
    device = stats.sum.device
    dist.all_reduce(stats.sum)
    dist.all_reduce(stats.count)
    counts = torch.tensor([tokens.total, tokens.images], device=device)
    dist.all_reduce(counts)
    low = torch.tensor([tokens.low], device=device)
    high = torch.tensor([tokens.high], device=device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    tokens = TokenStats(int(counts[0]), int(counts[1]), int(low), int(high))
    gathered: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, skipped)
    return stats, tokens, sorted((s for part in gathered for s in part), key=lambda s: s["index"])


def _write_skipped(out: Path, skipped: list[dict]) -> None:
    path = out.with_name(out.name + ".skipped.jsonl")
    if not skipped:
        path.unlink(missing_ok=True)
        return
    with open(path, "w") as fh:
        for entry in skipped:
            fh.write(json.dumps(entry) + "\n")
