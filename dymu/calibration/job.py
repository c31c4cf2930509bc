"""A threshold-finding run at scale: streaming, skip report, checkpoints, resume, torchrun.

Batches are numbered in stream order; with ``WORLD_SIZE > 1`` (torchrun) rank ``r`` takes
the batches whose number is ``r`` modulo the world size, and sums and counts are
all-reduced once at the end, so the result is that of one process over the same batches.
Each process checkpoints its own statistics and position (``OUT.partial``, or
``OUT.partial.rank<r>`` under torchrun); ``resume`` continues from there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..encoder.factory import build_encoder
from ..encoder.model import DyMUEncoder
from ..errors import DyMUError
from ..outputs import check_output
from ..sources.stream import Batch, ImageStream, iterate_batches, open_source
from ..thresholds import Thresholds
from ..towers.base import Inputs
from .checkpoint import Progress, partial_path, run_lock
from .config import DTYPES, CalibrationConfig
from .coverage import covers_metadata
from .inference_counts import inference_tokens
from .loop import CalibrationState, TokenStats, calibrate_batches, thresholds_from

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    thresholds: Thresholds
    tokens: TokenStats
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    num_tokens: int = 0


def run_calibration(
    cfg: CalibrationConfig,
    on_batch: Callable[[Batch, TokenStats], None] | None = None,
    on_start: Callable[[int | None], None] | None = None,
    encoder: DyMUEncoder | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Find thresholds as configured; only rank 0 writes files. However the run ends
    (finished, Ctrl-C, SIGTERM, an error), what was counted is kept in ``OUT.partial``.

    ``encoder`` is any encoder (e.g. ``dymu.build_encoder(model_instance)``); without one it
    is built from ``cfg.hf_model`` or ``cfg.model``. ``on_start(total)`` runs once the data
    and model are ready (``total``: images this process will see, when known); ``on_batch``
    after every batch; ``on_sample(done, total)`` before and during the inference-sample pass
    (rank 0). A second run on the same ``OUT`` (``OUT.lock`` held) is refused.
    """
    cfg.check()
    device = resolve_device(cfg.device)
    check_output(cfg.out_path)
    rank, world, owned = _init_distributed(device)
    try:
        with contextlib.ExitStack() as stack:
            _lock_every_rank(stack, cfg.out_path, rank, world, device)
            return _run(cfg, device, rank, world, (on_start, on_batch, on_sample), encoder)
    finally:
        if owned:  # every rank leaves together, after rank 0 has written its files
            dist.destroy_process_group()


def _run(
    cfg: CalibrationConfig,
    device: str,
    rank: int,
    world: int,
    hooks: tuple[Callable | None, Callable | None, Callable | None],
    encoder: DyMUEncoder | None,
) -> CalibrationResult:
    on_start, on_batch, on_sample = hooks
    source = open_source(cfg.data, cfg.image_root, image_column=cfg.image_column)
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
    partial = partial_path(cfg.out_path, rank, world)
    where = next(encoder.parameters()).device  # statistics stay beside the model
    progress = Progress(CalibrationState(encoder.tower.num_blocks, where))
    _start_or_resume(cfg, progress, partial, identity)
    stream = ImageStream(
        source,
        encoder.preprocess,
        _Share(cfg.batch_size, progress.next_batch, rank, world),
        cfg.max_images,
        cfg.shuffle_seed,
        max_pixels=cfg.max_pixels,
    )
    if on_start is not None:
        on_start(_expected_images(source, cfg, progress.next_batch, rank, world))
    progress.started = time.perf_counter()  # elapsed: from here, plus what a resume adds
    try:
        batches = _counted(cfg, stream, progress, partial, identity, on_batch)
        calibrate_batches(encoder, batches, encoder.r, progress.calibration)
        progress.mark()
        progress.save(partial, identity)  # this process's share, kept until the file is out
    except BaseException as exc:
        _keep_progress(exc, progress, partial, identity, cfg)
        raise
    result = _finish(cfg, encoder, source, progress, partial, (rank, world), on_sample)
    result.seconds = progress.elapsed()
    return result


def _finish(
    cfg: CalibrationConfig,
    encoder: DyMUEncoder,
    source,
    progress: Progress,
    partial: Path,
    placement: tuple[int, int],
    on_sample: Callable[[int, int], None] | None = None,
) -> CalibrationResult:
    """Every rank's statistics added up, the file's metadata (what it covered, both token
    counts) and the file written by rank 0."""
    rank, world = placement
    skipped = _reduce(progress, world)
    tokens = progress.calibration.tokens
    if tokens.images == 0:
        partial.unlink(missing_ok=True)
        example = f"; first: {skipped[0]['key']}: {skipped[0]['reason']}" if skipped else ""
        raise DyMUError(f"no usable images in {cfg.data} ({len(skipped)} skipped{example})")
    extra = covers_metadata(cfg.data, tokens.images + len(skipped))
    extra["calibration_tokens_mean"] = f"{tokens.mean:.2f}"  # the batch rule's count
    result = thresholds_from(
        progress.calibration, encoder, encoder.r, encoder.schedule_name, cfg.batch_size, extra
    )
    if rank == 0 and cfg.inference_sample:
        result.metadata.update(inference_tokens(encoder, result, source, cfg, on_sample))
    device = progress.calibration.sum.device
    _write_result(cfg, result, skipped, partial, placement, device)
    return CalibrationResult(result, tokens, skipped, num_tokens=encoder.tower.num_tokens)


@dataclass(frozen=True)
class _Share:
    """Which stream items a process decodes: those of its batches (number ``rank`` modulo
    ``world``) from ``first`` on. A class, not a closure, so DataLoader workers started with
    spawn (macOS, Python >= 3.14 on Linux) can receive it."""

    batch_size: int
    first: int
    rank: int
    world: int

    def __call__(self, index: int) -> bool:
        number = index // self.batch_size
        return number >= self.first and number % self.world == self.rank


def _start_or_resume(
    cfg: CalibrationConfig, progress: Progress, partial: Path, identity: dict[str, str]
) -> None:
    """Load ``partial`` with ``--resume``; refuse to silently overwrite it without."""
    if not partial.exists():
        if cfg.resume:  # a requeued job's first run has nothing to resume: not an error
            log.warning("--resume: no checkpoint %s yet, starting from the beginning", partial)
        return
    if not cfg.resume:
        raise DyMUError(
            f"{partial} holds an interrupted run: pass --resume to continue it, "
            "or delete it to start over"
        )
    progress.load(partial, identity)
    log.warning("resuming from %s at batch %d", partial, progress.next_batch)


def _counted(
    cfg: CalibrationConfig,
    stream: ImageStream,
    progress: Progress,
    partial: Path,
    identity: dict[str, str],
    on_batch: Callable[[Batch, TokenStats], None] | None,
) -> Iterator[Inputs]:
    """This process's batches; the code after ``yield`` runs once a batch is counted."""
    for done, batch in enumerate(iterate_batches(stream, cfg.batch_size, cfg.num_workers), 1):
        for item in batch.skipped:
            if cfg.strict:
                raise DyMUError(f"bad image {item.key}: {item.reason} (--strict)")
            progress.skipped.append({"index": item.index, "key": item.key, "reason": item.reason})
        if batch.pixels is not None:
            yield batch.pixels
        progress.next_batch = batch.index + 1
        progress.mark()
        if on_batch is not None:
            on_batch(batch, progress.calibration.tokens)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            progress.save(partial, identity)


def _keep_progress(
    exc: BaseException,
    progress: Progress,
    partial: Path,
    identity: dict[str, str],
    cfg: CalibrationConfig,
) -> None:
    """Save the last counted batch whatever stopped the run, and say where in the error."""
    if not progress.save(partial, identity):
        return
    where = f"progress before batch {progress.last.next_batch} is in {partial}"
    if isinstance(exc, torch.OutOfMemoryError):
        raise DyMUError(
            f"out of memory at --batch-size {cfg.batch_size}: try a smaller one (a fresh run: "
            f"delete {partial}) or --dtype bf16; {where}"
        ) from None
    if isinstance(exc, DyMUError):
        raise DyMUError(f"{exc}; {where}: fix the cause and add --resume") from None
    if isinstance(exc, Exception):
        log.error("%s: run the same command with --resume to continue", where)


def _write_result(
    cfg: CalibrationConfig,
    result: Thresholds,
    skipped: list[dict],
    partial: Path,
    placement: tuple[int, int],
    device: torch.device,
) -> None:
    """Rank 0 writes the file; only once it is on disk does any process drop its partial."""
    error, (rank, world) = None, placement
    if rank == 0:
        try:
            result.save(cfg.out_path)
            _write_skipped(cfg.out_path, skipped)
        except OSError as exc:
            error = exc.strerror or str(exc)
    if world > 1:  # every rank learns whether the file is out (and none returns before)
        flag = torch.tensor([error is None], dtype=torch.int64, device=device)
        dist.broadcast(flag, 0)
        error = error if bool(flag) else (error or "rank 0 could not write it")
    if error is not None:
        kept = partial.with_name(partial.name.split(".partial")[0] + ".partial*")
        raise DyMUError(
            f"cannot write {cfg.out_path}: {error}. Nothing is lost: the statistics are in "
            f"{kept}; make {cfg.out_path} writable and run the same command with --resume"
        )
    partial.unlink(missing_ok=True)


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
        "image_column": str(cfg.image_column),
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


def _lock_every_rank(
    stack: contextlib.ExitStack, out: Path, rank: int, world: int, device: str
) -> None:
    """Each rank locks its own file; under torchrun the ranks then agree before any work, so
    that a run refused by one rank (e.g. rank 0, whose ``OUT.lock`` another job holds) is
    refused by all of them, none left counting or waiting in a collective."""
    refusal = None
    try:
        stack.enter_context(run_lock(out, rank))
    except DyMUError as exc:
        refusal = exc
    if world > 1:
        refused = torch.tensor([refusal is not None], dtype=torch.int32, device=device)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)
        if refused.item() and refusal is None:
            refusal = DyMUError(f"another rank of this run could not lock {out}: see its message")
    if refusal is not None:
        raise refusal


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


def _reduce(state: Progress, world: int) -> list[dict]:
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
