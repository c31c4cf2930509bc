"""Console scripts: ``dymu-find-thresholds`` (also ``merge``, ``convert``) and ``dymu-encode``.

Each parses its options with only light imports (``--help`` and option errors answer at once)
and imports torch and the models once there is work to do.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .common import run_main
from .encode import PROG as ENCODE
from .encode import encode, encode_parser
from .find import PROG as FIND
from .find import (
    convert,
    convert_parser,
    find_thresholds,
    find_thresholds_parser,
    merge,
    merge_parser,
)

__all__ = ["encode_main", "find_thresholds_main"]


def find_thresholds_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-find-thresholds`` and its ``merge``/``convert`` subcommands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return run_main(f"{FIND} merge", merge, merge_parser(), argv[1:])
    if argv and argv[0] == "convert":
        return run_main(f"{FIND} convert", convert, convert_parser(), argv[1:])
    return run_main(FIND, find_thresholds, find_thresholds_parser(), argv)


def encode_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dymu-encode``."""
    return run_main(ENCODE, encode, encode_parser(), argv)
