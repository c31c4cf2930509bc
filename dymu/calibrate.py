"""Threshold finding (DToMe calibration): the batch rule plus running float64 statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from . import __version__
from .encoder import DyMUEncoder, EncoderOutput
from .schedule import make_schedule
from .thresholds import Thresholds


class RunningThresholds:
    """Sum and count of batch thresholds per block (float64), kept on the device."""

    def __init__(self, num_blocks: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(num_blocks, dtype=torch.float64, device=device)
        self.count = torch.zeros(num_blocks, dtype=torch.int64, device=device)
        self.images = 0

    def add(self, values: torch.Tensor, used: torch.Tensor, images: int) -> None:
        self.sum += torch.where(used, values, torch.zeros_like(values))
        self.count += used.long()
        self.images += images


def find_thresholds(
    encoder: DyMUEncoder,
    batches: Iterable[torch.Tensor],
    r_total: int | None = None,
    schedule: str | Sequence[int] | None = None,
    on_batch: Callable[[EncoderOutput], None] | None = None,
    metadata: dict[str, str] | None = None,
) -> Thresholds:
    """Stream preprocessed image batches through the encoder and average batch thresholds.

    ``r_total``/``schedule`` override the encoder's own schedule. ``on_batch`` sees each
    batch's output (progress bars, token statistics).
    """
    num_blocks = encoder.tower.num_blocks
    if r_total is None and schedule is None:
        r = list(encoder.r)
    else:
        spec_total = r_total if r_total is not None else sum(encoder.r)
        r = make_schedule(spec_total, num_blocks, schedule if schedule is not None else "constant")
    device = next(encoder.parameters()).device
    stats = RunningThresholds(num_blocks, device)
    batch_size = 0
    with torch.inference_mode():
        for pixels in batches:
            out, values, used = encoder.calibrate(pixels, r)
            stats.add(values, used, pixels.shape[0])
            batch_size = max(batch_size, pixels.shape[0])
            if on_batch is not None:
                on_batch(out)
    meta = {
        "model": encoder.name,
        "pretrained": encoder.pretrained,
        "r_total": str(sum(r)),
        "schedule": _schedule_label(schedule) if schedule is not None else encoder.schedule_name,
        "batch_size": str(batch_size),
        "images": str(stats.images),
        "dymu_version": __version__,
    }
    meta.update(metadata or {})
    return Thresholds(stats.sum.cpu(), stats.count.cpu(), torch.tensor(r), meta)


def _schedule_label(schedule: str | Sequence[int]) -> str:
    if isinstance(schedule, str):
        return schedule
    return "explicit:" + ",".join(str(int(v)) for v in schedule)
