"""lmms-eval's own ``llava_hf`` models with DyMU applied: ``dymu_llava_hf``.

The classes subclass lmms-eval's ``llava_hf`` (chat and simple), so prompts, chat templates,
generation settings and decoding are exactly lmms-eval's; after lmms-eval has loaded the
transformers model (LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision), ``__init__`` runs
:func:`dymu.integrations.hf_llava.apply` on that instance. Extra ``--model_args``:
``thresholds=FILE`` (DyMU) or ``r=INT`` (fixed-r ToMe, every image the same length), and
``vtu=True|False`` (default True).

Visual token counts: a forward hook on the DyMU encoder records each encoded view's length
(an image for LLaVA-1.5; an AnyRes crop or a video frame for NeXT and OneVision). They are
available live as ``model.token_stats`` and reported when lmms-eval calls ``clean()`` at the
end of ``evaluate()``: one log line, and lmms-eval's throughput section of the results
(``results["throughput"]``, keys ``avg_dymu_visual_tokens_*``: lmms-eval prefixes extra
keys with ``avg_``), which its results table prints too.
"""

from __future__ import annotations

import math
from typing import Any

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple
from loguru import logger as eval_logger
from transformers import LlavaForConditionalGeneration

from ...errors import DyMUError
from ...thresholds import Thresholds
from .. import hf_llava

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def token_summary(lengths: list[int], patches: int) -> dict[str, float | int]:
    """Mean, population std, min, max and count of per-view token counts, and ``unmerged``:
    the patch count of one view without merging (zeros when nothing was encoded)."""
    count = len(lengths)
    if count == 0:
        return dict(mean=0.0, std=0.0, min=0, max=0, count=0, unmerged=patches)
    mean = sum(lengths) / count
    std = math.sqrt(sum((n - mean) ** 2 for n in lengths) / count)
    low, high = min(lengths), max(lengths)
    return dict(mean=mean, std=std, min=low, max=high, count=count, unmerged=patches)


def _flag(value: Any, name: str) -> bool:
    """A boolean model argument (lmms-eval turns ``True``/``false`` into bools already)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DyMUError(f"dymu_llava_hf: {name}={value!r} is not True or False")


def _how(thresholds: Any, r: Any) -> dict[str, Any]:
    """``hf_llava.apply``'s thresholds/r, checked (and the file read) before the model loads."""
    if (thresholds is None) == (r is None):
        raise DyMUError(
            "dymu_llava_hf needs one of thresholds=FILE (DyMU) or r=INT (fixed-r ToMe) "
            "in --model_args"
        )
    if r is not None:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise DyMUError(f"dymu_llava_hf: r={r!r} must be a whole number >= 0")
        return {"r": r}
    return {"thresholds": Thresholds.load(str(thresholds))}


class _DyMU:
    """What both ``dymu_llava_hf`` classes add to lmms-eval's ``llava_hf``."""

    def __init__(self, thresholds: Any = None, vtu: Any = True, r: Any = None, **kwargs):
        how, use_vtu = _how(thresholds, r), _flag(vtu, "vtu")
        super().__init__(**kwargs)  # lmms-eval loads the model and processor
        model = self.model
        hf_llava.apply(model, vtu=use_vtu, **how)
        encoder = hf_llava.encoder_of(model)
        self._dymu_lengths: list = []  # per encoder call, kept on the device until read
        self._dymu_patches = encoder.tower.num_patches
        one_view = isinstance(model, LlavaForConditionalGeneration)  # LLaVA-1.5: no AnyRes
        self._dymu_unit = "image" if one_view else "view (AnyRes crop or video frame)"
        encoder.register_forward_hook(self._count_tokens)
        eval_logger.info(
            f"dymu_llava_hf: DyMU applied to {type(model).__name__} "
            f"({'r=' + str(r) if r is not None else 'thresholds=' + str(thresholds)}, "
            f"vtu={use_vtu})"
        )

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
        eval_logger.info(
            f"DyMU visual tokens per {self._dymu_unit}: mean {stats['mean']:.2f}, "
            f"std {stats['std']:.2f}, min {stats['min']}, max {stats['max']}, "
            f"count {stats['count']} (of {stats['unmerged']} patches)"
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


class DyMULlavaHf(_DyMU, _LlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` with DyMU (``--force_simple``)."""


class DyMULlavaHfChat(_DyMU, _LlavaHfChat):
    """lmms-eval's chat ``llava_hf`` with DyMU (what ``--model dymu_llava_hf`` runs)."""
