"""lmms-eval's own Qwen2.5-VL and Qwen3-VL models with DyMU applied: ``dymu_qwen2_5_vl`` and
``dymu_qwen3_vl``.

The classes subclass lmms-eval's ``qwen2_5_vl`` and ``qwen3_vl`` (chat and simple), so
prompts, chat templates, ``qwen_vl_utils``' image and video handling, generation settings and
decoding are exactly lmms-eval's; after lmms-eval has loaded the model, ``__init__`` applies
DyMU to that instance (:mod:`.base`). Extra ``--model_args``: ``thresholds=FILE`` (made for
the model's tower: ``dymu-find-thresholds --hf-model``) and ``vtu=True|False`` (default
True). Token counts are per image or per temporal patch of a video (see :mod:`.base`).
"""

from __future__ import annotations

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen25Chat
from lmms_eval.models.chat.qwen3_vl import Qwen3_VL as _Qwen3Chat
from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL as _Qwen25Simple
from lmms_eval.models.simple.qwen3_vl import Qwen3_VL as _Qwen3Simple

from .base import DyMUModel


class _QwenDyMU(DyMUModel):
    def _dymu_view(self, model) -> str:
        return "frame (an image, or a video's temporal patch)"


class _Qwen25(_QwenDyMU):
    model_id = "dymu_qwen2_5_vl"


class _Qwen3(_QwenDyMU):
    model_id = "dymu_qwen3_vl"


class DyMUQwen2_5_VL(_Qwen25, _Qwen25Simple):
    """lmms-eval's simple ``qwen2_5_vl`` with DyMU (``--force_simple``)."""


class DyMUQwen2_5_VLChat(_Qwen25, _Qwen25Chat):
    """lmms-eval's chat ``qwen2_5_vl`` with DyMU (what ``--model dymu_qwen2_5_vl`` runs)."""


class DyMUQwen3_VL(_Qwen3, _Qwen3Simple):
    """lmms-eval's simple ``qwen3_vl`` with DyMU (``--force_simple``)."""


class DyMUQwen3_VLChat(_Qwen3, _Qwen3Chat):
    """lmms-eval's chat ``qwen3_vl`` with DyMU (what ``--model dymu_qwen3_vl`` runs)."""
