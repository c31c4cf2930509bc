"""What every console script shares: how it runs (errors, Ctrl-C, SIGTERM), its help layout,
and the tower options. Nothing heavy is imported here: ``--help`` and option errors must not
wait for torch."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from .._version import __version__
from ..defaults import DEFAULT_MAX_PIXELS, DEFAULT_MODEL
from ..engine.schedule import SCHEDULES, canonical_schedule
from ..errors import DyMUError

# where an option can be added: a parser or one of its argument groups (what --help lists
# under a heading); argparse names no public type for the group
Options = argparse.ArgumentParser | argparse._ArgumentGroup


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers send before preemption), handled like Ctrl-C."""


class UsageError(Exception):
    """A bad option, reported in one line (argparse would print the whole usage first)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class Stop(Exception):
    """End the script with this one-line message and exit code (e.g. after an interrupt)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def interrupt_code(exc: KeyboardInterrupt) -> tuple[str, int]:
    """How an interrupt is named and which exit code it gets (128 + the signal number)."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)", 128 + signal.SIGTERM
    return "interrupted", 128 + signal.SIGINT


def run_main(
    prog: str,
    main: Callable[[argparse.Namespace], int | None],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse, run, and turn every expected failure into one line on stderr and an exit code."""
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        with _log_to_stderr(prog, getattr(args, "verbose", False)), _sigterm_as_interrupt():
            return main(args) or 0
    except DyMUError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Stop as exc:
        if str(exc):
            print(f"{prog}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt as exc:
        why, code = interrupt_code(exc)
        print(f"{prog}: {why}", file=sys.stderr)
        return code


@contextmanager
def _log_to_stderr(prog: str, verbose: bool = False):
    """dymu's own log lines (warnings and up; info too with ``--verbose``), prefixed with
    the script's name, while the script runs. Only the ``dymu`` logger is configured: other
    libraries keep their own handlers, so nothing prints twice."""
    logger = logging.getLogger("dymu")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False  # a library's logging.warning() may have set up the root logger
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


@contextmanager
def _sigterm_as_interrupt():
    """Raise :class:`Terminated` on SIGTERM while the script runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown once: only where the help text does not already say its default, and
    not for flags or options without one. Descriptions and examples keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def new_parser(prog: str, description: str, epilog: str | None = None, usage: str | None = None):
    """A parser with the shared help layout and ``--version``; a one-paragraph description
    is wrapped here (descriptions with line breaks keep them)."""
    if "\n" not in description:
        description = textwrap.fill(description, 88)
    p = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        usage=usage,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print dymu's progress details and the model libraries' messages and bars",
    )
    return p


def positive(low: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``low`` (refused as an option, one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def schedule_type(value: str) -> str | list[int]:
    """A schedule name (``reverse-linear`` as in model names, or ``reverse_linear``; the
    underscore form is what files record) or a comma list of ints."""
    if canonical_schedule(value) in SCHEDULES:
        return canonical_schedule(value)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not one of constant, linear, reverse-linear or a comma-separated "
            "list of ints"
        ) from None


def add_image_limits(p: Options, what_happens: str, gpu_default: str) -> None:
    """``--max-pixels`` and ``--device``, which every script that decodes and encodes takes."""
    add_max_pixels(p, what_happens)
    add_device(p, gpu_default)


def add_max_pixels(p: Options, what_happens: str) -> None:
    p.add_argument(
        "--max-pixels",
        type=positive(1),
        default=DEFAULT_MAX_PIXELS,
        help=f"{what_happens} images with more pixels than this (decompression bombs, scans)",
    )


def add_device(p: Options, gpu_default: str) -> None:
    p.add_argument(
        "--device",
        default=None,
        help=f"torch device: cpu, cuda, cuda:N, mps (default: {gpu_default} if there is a "
        "GPU, else cpu)",
    )


def add_model_config(p: Options) -> None:
    p.add_argument(
        "--model-config",
        action="append",
        default=[],
        metavar="JSON",
        help="register an extra open_clip model config (a file or folder); repeatable",
    )


def register_configs(paths: list[str]) -> None:
    if not paths:
        return
    import open_clip

    for path in paths:
        if not Path(path).exists():
            raise DyMUError(f"model config not found: {path}")
        open_clip.add_model_config(path)


def add_tower_choice(p: Options, pretrained_default: str = "openai") -> None:
    p.add_argument(
        "--model",
        default=None,
        help="dymu model name: <open_clip model>-tome[-<K>out][-linear|-reverse-linear]; "
        "the open_clip model may be a CLIP or a SigLIP/SigLIP2 (timm) tower "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="open_clip weights tag, a checkpoint path, or 'none' for random weights "
        f"(default: {pretrained_default})",
    )
    p.add_argument(
        "--hf-model",
        metavar="PATH",
        default=None,
        help="a local transformers model folder (save_pretrained) instead of --model: a "
        "vision model (CLIP, SigLIP, SigLIP2, ViT, DINOv2) or a VLM, whose vision tower is used",
    )


def tower_choice(args: argparse.Namespace) -> tuple[str, str | None]:
    """(model, pretrained) from --model/--pretrained or --hf-model, which exclude each other."""
    if args.hf_model is not None:
        if args.model is not None or args.pretrained is not None:
            raise DyMUError(
                "--hf-model brings its own tower and weights: drop --model/--pretrained"
            )
        return args.hf_model, None
    return args.model or DEFAULT_MODEL, args.pretrained
