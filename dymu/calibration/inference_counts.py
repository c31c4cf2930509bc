"""What thresholds keep at inference, measured right after calibration.

The batch rule's count during calibration is ``num_tokens - r_total`` by construction; the
thresholds, applied image by image, keep a different number. This encodes the first images
of the stream with the found thresholds so the file can say which (README: two token counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..encoder.model import DyMUEncoder
from ..sources.stream import ImageStream, iterate_batches
from ..thresholds import Thresholds

if TYPE_CHECKING:
    from .config import CalibrationConfig


def inference_tokens(
    encoder: DyMUEncoder,
    thresholds: Thresholds,
    source,
    cfg: CalibrationConfig,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Tokens per image when the first images of the stream are encoded with ``thresholds``:
    what inference will keep, which differs from the batch rule's count during calibration
    (a mean threshold applied image by image is not the batch's top-r). Metadata entries.
    ``on_progress(done, total)`` is called before the first batch and after each one."""
    count = min(cfg.inference_sample, cfg.max_images or cfg.inference_sample)
    if hasattr(source, "__len__"):
        count = min(count, len(source))
    stream = ImageStream(
        source,
        encoder.preprocess,
        max_images=count,
        shuffle_seed=cfg.shuffle_seed,
        max_pixels=cfg.max_pixels,
    )
    previous = encoder.thresholds
    encoder.set_thresholds(thresholds)
    lengths, done = [], 0
    if on_progress is not None:
        on_progress(done, count)
    try:
        with torch.inference_mode():
            for batch in iterate_batches(stream, cfg.batch_size, cfg.num_workers):
                if batch.pixels is not None:
                    lengths.append(encoder(batch.pixels).lengths.cpu())
                done += batch.size + len(batch.skipped)
                if on_progress is not None:
                    on_progress(done, count)
    finally:
        encoder.thresholds = previous
    if not lengths:
        return {}
    values = torch.cat(lengths).double()
    return {
        "inference_images": str(values.numel()),
        "inference_tokens_mean": f"{values.mean().item():.2f}",
        "inference_tokens_std": f"{values.std(unbiased=False).item():.2f}",
        "inference_tokens_min": str(int(values.min())),
        "inference_tokens_max": str(int(values.max())),
    }
