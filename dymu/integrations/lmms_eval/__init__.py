"""dymu as an lmms-eval plugin: ``lmms-eval --model dymu_llava_hf --model_args ...``.

lmms-eval (0.7 and later) builds its model registry when ``lmms_eval.models`` is imported:
it loads every entry point of the group ``lmms_eval.models`` and registers what it returns,
a ``ModelManifest`` (or an iterable of them, or a callable giving one). dymu's setup.cfg
names :func:`manifest` there. This module stays light (it runs on every lmms-eval start and
while ``lmms_eval.models`` is still importing): the model classes live in
:mod:`dymu.integrations.lmms_eval.llava_hf` and are imported only when a run asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "dymu_llava_hf"
_CLASSES = "dymu.integrations.lmms_eval.llava_hf"


def manifest() -> ModelManifest:
    """The ``dymu_llava_hf`` manifest: like lmms-eval's ``llava_hf``, a chat class (the
    default) and a simple class (``--force_simple``), both with DyMU applied."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        simple_class_path=f"{_CLASSES}.DyMULlavaHf",
        chat_class_path=f"{_CLASSES}.DyMULlavaHfChat",
    )
