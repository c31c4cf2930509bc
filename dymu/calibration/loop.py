"""Threshold finding (DToMe calibration): the one calibration loop and the one metadata builder.

:func:`calibrate_batches` runs batches through the batch rule and adds their thresholds to a
:class:`CalibrationState`; :func:`thresholds_from` turns a state into a :class:`Thresholds`
with the metadata every threshold file carries. :func:`find_thresholds` (Python) and the
``dymu-find-thresholds`` job (streaming, resume, torchrun: ``job.py``) are both these two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .._version import __version__
from ..encoder.model import DyMUEncoder, EncoderOutput
from ..engine.schedule import make_schedule
from ..thresholds import Thresholds
from ..towers.base import Inputs

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class TokenStats:
    """Running mean/min/max of tokens per image (flat memory, however many images)."""

    total: int = 0
    images: int = 0
    low: int = 1 << 62
    high: int = 0

    def add(self, lengths: torch.Tensor | tuple[int, ...]) -> None:
        values = lengths.tolist() if torch.is_tensor(lengths) else list(lengths)
        self.total += sum(values)
        self.images += len(values)
        self.low = min([self.low, *values])
        self.high = max([self.high, *values])

    @property
    def mean(self) -> float:
        return self.total / max(self.images, 1)


class CalibrationState:
    """Everything a calibration has accumulated: per-block float64 sums and counts of batch
    thresholds (kept on the device), and tokens per image (the host's copy of each batch's
    lengths: the progress bar shows them)."""

    def __init__(self, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(num_blocks, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_blocks, dtype=torch.int64, device=device)
        self.tokens = TokenStats()
        self.largest_batch = 0

    @property
    def images(self) -> int:
        return self.tokens.images

    def add(self, out: EncoderOutput, values: torch.Tensor, used: torch.Tensor) -> None:
        """One batch: its thresholds where a block recorded one, its token counts."""
        self.sum += torch.where(used, values, torch.zeros_like(values))
        self.count += used.long()
        # the host knows the lengths after the forward: no read of the device
        self.tokens.add(out.host_lengths if out.host_lengths is not None else out.lengths)
        self.largest_batch = max(self.largest_batch, int(out.lengths.numel()))


def calibrate_batches(
    encoder: DyMUEncoder,
    batches: Iterable[Inputs],
    r: Sequence[int],
    state: CalibrationState,
    on_batch: Callable[[EncoderOutput], None] | None = None,
) -> None:
    """The calibration loop: each batch through the batch rule with schedule ``r``, its
    statistics into ``state``, then ``on_batch`` (progress bars, checkpoints)."""
    with torch.inference_mode():
        for inputs in batches:
            out, values, used = encoder.calibrate(inputs, r)
            state.add(out, values, used)
            if on_batch is not None:
                on_batch(out)


def thresholds_from(
    state: CalibrationState,
    encoder: DyMUEncoder,
    r: Sequence[int],
    schedule: str,
    batch_size: int,
    extra: dict[str, str] | None = None,
) -> Thresholds:
    """The thresholds file of a finished calibration, with its metadata (see
    ``thresholds/README.md``): the model and weights, the schedule, the data seen, and the
    tower it fits."""
    dtype = next(encoder.parameters()).dtype
    meta = {
        "model": encoder.name,
        "pretrained": encoder.pretrained,
        "r_total": str(sum(r)),
        "schedule": schedule,
        "batch_size": str(batch_size),
        "images": str(state.images),
        "dymu_version": __version__,
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        **encoder.identity.metadata(),
    }
    meta.update(extra or {})
    return Thresholds(state.sum.cpu(), state.count.cpu(), torch.tensor(list(r)), meta)


def find_thresholds(
    encoder: DyMUEncoder,
    batches: Iterable[Inputs],
    r_total: int | None = None,
    schedule: str | Sequence[int] | None = None,
    on_batch: Callable[[EncoderOutput], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> Thresholds:
    """Stream preprocessed image batches through the encoder and average batch thresholds.

    ``r_total``/``schedule`` override the encoder's own schedule. ``on_batch`` sees each
    batch's output (progress bars, token statistics); ``metadata`` is added to the file's.
    """
    num_blocks = encoder.tower.num_blocks
    if r_total is None and schedule is None:
        r, label = list(encoder.r), encoder.schedule_name
    else:
        spec_total = r_total if r_total is not None else sum(encoder.r)
        r = make_schedule(spec_total, num_blocks, schedule if schedule is not None else "constant")
        label = schedule_label(schedule) if schedule is not None else "constant"
    state = CalibrationState(num_blocks, next(encoder.parameters()).device)
    calibrate_batches(encoder, batches, r, state, on_batch)
    return thresholds_from(state, encoder, r, label, state.largest_batch, metadata)


def schedule_label(schedule: str | Sequence[int]) -> str:
    if isinstance(schedule, str):
        return schedule
    return "explicit:" + ",".join(str(int(v)) for v in schedule)
