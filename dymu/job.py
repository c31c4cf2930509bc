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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from .adapters.base import Inputs
from .calibrate import CalibrationState, TokenStats, calibrate_batches, thresholds_from
from .data import Batch, ImageStream, iterate_batches, open_source
from .encoder import DyMUEncoder
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
    "tower_arch",
    "tower_weights",
)


@dataclass
class CalibrationConfig:
    """Everything ``dymu-find-thresholds`` takes (see its ``--help``)."""

    data: str
    model: str = "ViT-L-14-336-tome"
    pretrained: str | None = "openai"
    hf_model: str | None = None  # a local transformers folder instead of a dymu name
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
        if self.out:
            return Path(self.out)
        if self.hf_model:
            return Path(f"{Path(self.hf_model).name}-tome.safetensors")
        return Path(f"{self.model}.safetensors")


@dataclass
class CalibrationResult:
    thresholds: Thresholds
    tokens: TokenStats
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    num_tokens: int = 0


@dataclass
class _State:
    calibration: CalibrationState
    skipped: list[dict]
    next_batch: int = 0


def run_calibration(
    cfg: CalibrationConfig,
    on_batch: Callable[[Batch, TokenStats], None] | None = None,
    on_start: Callable[[int | None], None] | None = None,
    encoder: DyMUEncoder | None = None,
) -> CalibrationResult:
    """Find thresholds as configured; only rank 0 writes files. Ctrl-C leaves a checkpoint.

    ``encoder`` is any encoder (e.g. ``dymu.build_encoder(model_instance)``); without one it
    is built from ``cfg.hf_model`` or ``cfg.model``. ``on_start(total)`` runs once the data
    and model are ready (``total``: images this process will see, when known); ``on_batch``
    after every batch.
    """
    if cfg.batch_size < 1:
        raise DyMUError("--batch-size must be at least 1")
    if cfg.max_images is not None and cfg.max_images < 1:
        raise DyMUError(f"--max-images must be at least 1, got {cfg.max_images}")
    if cfg.num_workers < 0:
        raise DyMUError(
            f"--num-workers must be 0 (decode in this process) or more, got {cfg.num_workers}"
        )
    if cfg.dtype not in DTYPES:
        raise DyMUError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    device = _device(cfg.device)
    rank, world, owned = _init_distributed(device)
    try:
        return _run(cfg, device, rank, world, on_batch, on_start, encoder)
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
    encoder: DyMUEncoder | None,
) -> CalibrationResult:
    source = open_source(cfg.data, cfg.image_root)
    if encoder is None:
        encoder = build_encoder(
            cfg.hf_model or cfg.model,
            None if cfg.hf_model else cfg.pretrained,
            device=device,
            dtype=DTYPES[cfg.dtype],
            r_total=cfg.r_total,
            schedule=cfg.schedule,
        )
    identity = _run_identity(cfg, encoder, world)
    partial = _partial_path(cfg.out_path, rank, world)
    param = next(encoder.parameters())
    state = _State(CalibrationState(encoder.tower.num_blocks, param.device), [])
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
    start = time.perf_counter()

    def batches() -> Iterator[Inputs]:
        """This process's batches; the code after ``yield`` runs once a batch is counted."""
        for done, batch in enumerate(iterate_batches(stream, cfg.batch_size, cfg.num_workers), 1):
            for item in batch.skipped:
                if cfg.strict:
                    raise DyMUError(f"bad image {item.key}: {item.reason} (--strict)")
                state.skipped.append({"index": item.index, "key": item.key, "reason": item.reason})
            if batch.pixels is not None:
                yield batch.pixels
            state.next_batch = batch.index + 1
            if on_batch is not None:
                on_batch(batch, state.calibration.tokens)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                _save_partial(partial, state, identity)

    try:
        calibrate_batches(encoder, batches(), encoder.r, state.calibration)
    except KeyboardInterrupt:
        _save_partial(partial, state, identity)
        raise
    skipped = _reduce(state, world)
    tokens = state.calibration.tokens
    if tokens.images == 0:
        example = f"; first: {skipped[0]['key']}: {skipped[0]['reason']}" if skipped else ""
        raise DyMUError(f"no usable images in {cfg.data} ({len(skipped)} skipped{example})")
    result = thresholds_from(
        state.calibration, encoder, encoder.r, encoder.schedule_name, cfg.batch_size
    )
    if rank == 0:
        result.save(cfg.out_path)
        _write_skipped(cfg.out_path, skipped)
    partial.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()  # no rank returns before the result is on disk
    return CalibrationResult(
        result, tokens, skipped, time.perf_counter() - start, encoder.tower.num_tokens
    )


def _run_identity(cfg: CalibrationConfig, encoder: DyMUEncoder, world: int) -> dict[str, str]:
    """What a resumed run must share with the interrupted one (``_RESUME_KEYS``)."""
    tower = encoder.identity
    return {
        "model": encoder.name,
        "pretrained": encoder.pretrained,
        "data": cfg.data,
        "batch_size": str(cfg.batch_size),
        "r": ",".join(map(str, encoder.r)),
        "max_images": str(cfg.max_images),
        "shuffle_seed": str(cfg.shuffle_seed),
        "dtype": cfg.dtype,
        "world_size": str(world),
        "tower_arch": tower.architecture,
        "tower_weights": tower.fingerprint,
    }


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
    calibration = state.calibration
    meta = dict(
        identity,
        format=PARTIAL_FORMAT,
        next_batch=str(state.next_batch),
        tokens=json.dumps(asdict(calibration.tokens)),
        skipped=json.dumps(state.skipped),
    )
    tensors = {"sum": calibration.sum.cpu(), "count": calibration.count.cpu()}
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
    calibration = state.calibration
    calibration.sum += tensors["sum"].to(calibration.sum.device)
    calibration.count += tensors["count"].to(calibration.count.device)
    calibration.tokens = TokenStats(**json.loads(meta["tokens"]))
    state.skipped = json.loads(meta["skipped"])
    state.next_batch = int(meta["next_batch"])


def _reduce(state: _State, world: int) -> list[dict]:
    """Add up every rank's statistics into ``state`` (once, at the end); all skipped images."""
    calibration, skipped = state.calibration, state.skipped
    if world == 1:
        return sorted(skipped, key=lambda s: s["index"])
    tokens = calibration.tokens
    device = calibration.sum.device
    dist.all_reduce(calibration.sum)
    dist.all_reduce(calibration.count)
    counts = torch.tensor([tokens.total, tokens.images], device=device)
    dist.all_reduce(counts)
    low = torch.tensor([tokens.low], device=device)
    high = torch.tensor([tokens.high], device=device)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    calibration.tokens = TokenStats(int(counts[0]), int(counts[1]), int(low), int(high))
    gathered: list[list[dict]] = [[] for _ in range(world)]
    dist.all_gather_object(gathered, skipped)
    return sorted((s for part in gathered for s in part), key=lambda s: s["index"])


def _write_skipped(out: Path, skipped: list[dict]) -> None:
    path = out.with_name(out.name + ".skipped.jsonl")
    if not skipped:
        path.unlink(missing_ok=True)
        return
    with open(path, "w") as fh:
        for entry in skipped:
            fh.write(json.dumps(entry) + "\n")
