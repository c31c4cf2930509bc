"""What every ``dymu_*`` lmms-eval model adds to lmms-eval's own class for its family.

:class:`DyMUModel` is mixed in before lmms-eval's class: it takes dymu's ``--model_args``
(``thresholds=FILE``, ``vtu=True|False`` and, where the family has it, ``r=INT``), lets
lmms-eval load the transformers model and processor as it always does, then applies DyMU to
that instance with ``dymu.apply`` (which dispatches on the model's class).

Visual token counts: a forward hook on the DyMU encoder records each encoded view's length
(an image; an AnyRes crop or a video frame for LLaVA-NeXT/OneVision; an image or a video's
temporal patch for Qwen-VL). They are available live as ``model.token_stats`` and reported
when lmms-eval calls ``clean()`` at the end of ``evaluate()``: one log line, and lmms-eval's
throughput section of the results (``results["throughput"]``, keys
``avg_dymu_visual_tokens_*``: lmms-eval prefixes extra keys with ``avg_``), which its results
table prints too.
"""

from __future__ import annotations

import math
from typing import Any

from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger

from ...errors import DyMUError
from ...thresholds import Thresholds
from ..dispatch import apply, integration_for

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def token_summary(lengths: list[int], patches: int) -> dict[str, float | int]:
    """Mean, population std, min, max and count of per-view token counts, and ``unmerged``:
    the patch count of one view without merging (0: it varies, as with Qwen's dynamic
    resolution; zeros when nothing was encoded)."""
    count = len(lengths)
    if count == 0:
        return dict(mean=0.0, std=0.0, min=0, max=0, count=0, unmerged=patches)
    mean = sum(lengths) / count
    std = math.sqrt(sum((n - mean) ** 2 for n in lengths) / count)
    low, high = min(lengths), max(lengths)
    return dict(mean=mean, std=std, min=low, max=high, count=count, unmerged=patches)


def flag(value: Any, name: str, model_id: str) -> bool:
    """A boolean model argument (lmms-eval turns ``True``/``false`` into bools already)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DyMUError(f"{model_id}: {name}={value!r} is not True or False")


class DyMUModel:
    """dymu's part of a ``dymu_*`` model: mixed in before lmms-eval's own class."""

    model_id = "dymu"
    takes_r = False  # fixed-r ToMe (``r=INT``): the LLaVA family only

    def __init__(self, thresholds: Any = None, vtu: Any = True, r: Any = None, **kwargs):
        how, use_vtu = self._dymu_how(thresholds, r), flag(vtu, "vtu", self.model_id)
        super().__init__(**kwargs)  # lmms-eval loads the model and processor
        model = self.model
        apply(model, vtu=use_vtu, **how)
        encoder = integration_for(model).encoder_of(model)
        self._dymu_lengths: list = []  # per encoder call, kept on the device until read
        self._dymu_patches = self._dymu_unmerged(encoder)
        self._dymu_unit = self._dymu_view(model)
        encoder.register_forward_hook(self._count_tokens)
        eval_logger.info(
            f"{self.model_id}: DyMU applied to {type(model).__name__} "
            f"({'r=' + str(r) if r is not None else 'thresholds=' + str(thresholds)}, "
            f"vtu={use_vtu})"
        )

    def _dymu_how(self, thresholds: Any, r: Any) -> dict[str, Any]:
        """``apply``'s thresholds (or r), checked and the file read before the model loads."""
        if not self.takes_r:
            if r is not None or thresholds is None:
                raise DyMUError(f"{self.model_id} needs thresholds=FILE in --model_args")
            return {"thresholds": Thresholds.load(str(thresholds))}
        if (thresholds is None) == (r is None):
            raise DyMUError(
                f"{self.model_id} needs one of thresholds=FILE (DyMU) or r=INT (fixed-r ToMe) "
                "in --model_args"
            )
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise DyMUError(f"{self.model_id}: r={r!r} must be a whole number >= 0")
            return {"r": r}
        return {"thresholds": Thresholds.load(str(thresholds))}

    def _dymu_unmerged(self, encoder) -> int:
        """Tokens of one view without merging (0: it varies)."""
        return 0

    def _dymu_view(self, model) -> str:
        """What one encoded view is, for the log line."""
        return "view"

    def _count_tokens(self, module, args, output) -> None:
        self._dymu_lengths.append(output.lengths.detach())  # no host sync per batch

    def _lengths(self) -> list[int]:
        return [n for part in self._dymu_lengths for n in part.tolist()]

    @property
    def token_stats(self) -> dict[str, float | int]:
        """Visual tokens per encoded view so far: mean, std, min, max, count, unmerged."""
        return token_summary(self._lengths(), self._dymu_patches)

    def clean(self) -> None:
        """lmms-eval calls this once, at the end of ``evaluate()``: report, then clean up."""
        self._report_tokens()
        super().clean()

    def _report_tokens(self) -> None:
        """Gather every rank's counts, log them and add them to lmms-eval's results."""
        lengths = _gathered(self._lengths(), self.world_size)
        stats = token_summary(lengths, self._dymu_patches)
        if self.rank != 0:
            return
        of = f"of {stats['unmerged']} patches" if stats["unmerged"] else "unmerged: varies"
        eval_logger.info(
            f"DyMU visual tokens per {self._dymu_unit}: mean {stats['mean']:.2f}, "
            f"std {stats['std']:.2f}, min {stats['min']}, max {stats['max']}, "
            f"count {stats['count']} ({of})"
        )
        log_metrics(  # lmms-eval's one channel into results: results["throughput"]
            total_elapsed_time=0.0,
            total_gen_tokens=0,
            avg_speed=0.0,
            additional_metrics={f"dymu_visual_tokens_{k}": v for k, v in stats.items()},
        )


def _gathered(lengths: list[int], world_size: int) -> list[int]:
    """Every rank's lengths, in rank order (this rank's alone when not distributed)."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return list(lengths)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(lengths))
    return [n for part in parts for n in part]
