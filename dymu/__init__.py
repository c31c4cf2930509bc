"""dymu: dynamic token merging (DyMU) for vision transformers and VLMs, training-free."""

__version__ = "0.1.0"

from .calibrate import find_thresholds  # noqa: E402
from .encoder import DyMUEncoder, EncoderOutput  # noqa: E402
from .errors import DyMUError  # noqa: E402
from .factory import build_encoder, load_encoder  # noqa: E402
from .names import resolve_name  # noqa: E402
from .schedule import make_schedule  # noqa: E402
from .thresholds import Thresholds  # noqa: E402
from .tome import apply_tome, remove_tome  # noqa: E402
from .vtu import apply_vtu, remove_vtu  # noqa: E402

__all__ = [
    "DyMUEncoder",
    "DyMUError",
    "EncoderOutput",
    "Thresholds",
    "__version__",
    "apply_tome",
    "apply_vtu",
    "build_encoder",
    "find_thresholds",
    "load_encoder",
    "make_schedule",
    "remove_tome",
    "remove_vtu",
    "resolve_name",
]
