"""Defaults the command line shows in ``--help``, kept free of heavy imports (``--help`` must
not wait for torch)."""

DEFAULT_MODEL = "ViT-L-14-336-tome"
DEFAULT_MAX_PIXELS = 100_000_000
"""Images larger than this (width x height) are skipped as bad (``--max-pixels``): decoding
one 200-megapixel PNG takes 600 MB per worker, far more than a tower's input needs."""
INFERENCE_SAMPLE = 256
"""Images encoded with the found thresholds after calibration, for the inference token count."""
DTYPE_NAMES = ("fp32", "bf16", "fp16")
