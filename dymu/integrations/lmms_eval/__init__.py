"""dymu as an lmms-eval plugin: ``lmms-eval --model dymu_llava_hf --model_args ...`` (and
``dymu_qwen2_5_vl``, ``dymu_qwen3_vl``).

lmms-eval (0.7 and later) builds its model registry when ``lmms_eval.models`` is imported:
it loads every entry point of the group ``lmms_eval.models`` and registers what it returns,
a ``ModelManifest`` (or an iterable of them, or a callable giving one). dymu's setup.cfg
names :func:`manifest` (and the Qwen manifests) there. This module stays light (it runs on
every lmms-eval start and while ``lmms_eval.models`` is still importing): the model classes
live in :mod:`.llava_hf` and :mod:`.qwen_vl` and are imported only when a run asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "dymu_llava_hf"
_CLASSES = "dymu.integrations.lmms_eval.llava_hf"
_QWEN = "dymu.integrations.lmms_eval.qwen_vl"


def manifest() -> ModelManifest:
    """The ``dymu_llava_hf`` manifest: like lmms-eval's ``llava_hf``, a chat class (the
    default) and a simple class (``--force_simple``), both with DyMU applied."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{_CLASSES}.DyMULlavaHf",
        chat_class_path=f"{_CLASSES}.DyMULlavaHfChat",
    )


def qwen2_5_vl_manifest() -> ModelManifest:
    """``dymu_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` (chat, and simple with
    ``--force_simple``) with DyMU applied."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="dymu_qwen2_5_vl",
        simple_class_path=f"{_QWEN}.DyMUQwen2_5_VL",
        chat_class_path=f"{_QWEN}.DyMUQwen2_5_VLChat",
    )


def qwen3_vl_manifest() -> ModelManifest:
    """``dymu_qwen3_vl``: lmms-eval's ``qwen3_vl`` with DyMU applied."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="dymu_qwen3_vl",
        simple_class_path=f"{_QWEN}.DyMUQwen3_VL",
        chat_class_path=f"{_QWEN}.DyMUQwen3_VLChat",
    )
