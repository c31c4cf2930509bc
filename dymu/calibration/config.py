"""A threshold-finding run's settings (``dymu-find-thresholds`` options), checked in one
line each before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..defaults import DEFAULT_MAX_PIXELS, INFERENCE_SAMPLE
from ..engine.schedule import canonical_schedule
from ..errors import DyMUError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    image_column: str | None = None  # Hugging Face datasets sources only
    max_images: int | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    shuffle_seed: int | None = None
    strict: bool = False
    checkpoint_every: int = 100
    resume: bool = False
    inference_sample: int = INFERENCE_SAMPLE

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        if self.hf_model:
            return Path(f"{Path(self.hf_model).name}-tome.safetensors")
        return Path(f"{self.model}.safetensors")

    def check(self) -> None:
        """Refuse out-of-range options in one line, before any work starts."""
        at_least = {"batch_size": 1, "max_images": 1, "max_pixels": 1, "num_workers": 0}
        at_least |= {"checkpoint_every": 0, "inference_sample": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                flag = "--" + name.replace("_", "-")
                raise DyMUError(f"{flag} must be at least {low}, got {value}")
        if self.dtype not in DTYPES:
            raise DyMUError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if isinstance(self.schedule, str):  # files record one spelling of each schedule
            self.schedule = canonical_schedule(self.schedule)
        if self.hf_model is not None:
            _check_model_folder(Path(self.hf_model))


def _check_model_folder(folder: Path) -> None:
    """An ``--hf-model`` that cannot be a transformers folder, refused before data is opened."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "not found"
        raise DyMUError(f"--hf-model {folder}: {what} (give a save_pretrained folder)")
    if not (folder / "config.json").is_file():
        raise DyMUError(f"--hf-model {folder} is not a transformers model folder (no config.json)")
