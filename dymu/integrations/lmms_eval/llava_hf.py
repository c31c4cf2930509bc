"""lmms-eval's own ``llava_hf`` models with DyMU applied: ``dymu_llava_hf``.

The classes subclass lmms-eval's ``llava_hf`` (chat and simple), so prompts, chat templates,
generation settings and decoding are exactly lmms-eval's; after lmms-eval has loaded the
transformers model (LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision), ``__init__`` applies DyMU to
that instance (:mod:`.base`). Extra ``--model_args``: ``thresholds=FILE`` (DyMU) or
``r=INT`` (fixed-r ToMe, every image the same length), and ``vtu=True|False`` (default
True). Token counts: see :mod:`.base`.
"""

from __future__ import annotations

from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHfChat
from lmms_eval.models.simple.llava_hf import LlavaHf as _LlavaHfSimple
from transformers import LlavaForConditionalGeneration

from .base import DyMUModel, token_summary

__all__ = ["DyMULlavaHf", "DyMULlavaHfChat", "token_summary"]


class _LlavaDyMU(DyMUModel):
    model_id = "dymu_llava_hf"
    takes_r = True

    def _dymu_unmerged(self, encoder) -> int:
        return encoder.tower.num_patches

    def _dymu_view(self, model) -> str:
        one_view = isinstance(model, LlavaForConditionalGeneration)  # LLaVA-1.5: no AnyRes
        return "image" if one_view else "view (AnyRes crop or video frame)"


class DyMULlavaHf(_LlavaDyMU, _LlavaHfSimple):
    """lmms-eval's simple ``llava_hf`` with DyMU (``--force_simple``)."""


class DyMULlavaHfChat(_LlavaDyMU, _LlavaHfChat):
    """lmms-eval's chat ``llava_hf`` with DyMU (what ``--model dymu_llava_hf`` runs)."""
