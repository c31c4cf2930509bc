"""Keep the model libraries' own output out of dymu's one-line messages: open_clip's
root-logger lines while it builds a model, transformers' progress bars while a folder loads.
Whatever is changed here is put back as it was."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class _Capture(logging.Filter):
    """Hold back the records logged from inside one package's folder."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(self.folder):
            self.records.append(record)
            return False
        return True


class _LastResort(logging.Handler):
    """Stands in for a root logger without handlers: records open_clip does not log still
    reach Python's last-resort stderr handler, as they would without it; open_clip's
    ``logging.warning`` sees a handler and so does not configure the root logger."""

    def emit(self, record: logging.LogRecord) -> None:
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


@contextmanager
def open_clip_logs() -> Iterator[None]:
    """open_clip logs to the root logger (``ERROR:root:...`` before it raises, a warning on
    every random init). Hold those lines back while a model is built and repeat them as dymu
    info lines afterwards (``--verbose`` shows them). A root logger without handlers is not
    configured by open_clip's ``logging.warning`` meanwhile."""
    import open_clip

    root = logging.getLogger()
    capture = _Capture(os.path.dirname(os.path.abspath(open_clip.__file__)) + os.sep)
    spare = _LastResort() if not root.handlers else None
    if spare is not None:
        root.addHandler(spare)
    root.addFilter(capture)
    try:
        yield
    finally:
        root.removeFilter(capture)
        if spare is not None:
            root.removeHandler(spare)
        for record in capture.records:
            log.info("open_clip: %s", record.getMessage())


def _hidden(factory, args, kwargs):
    return factory(*args, **dict(kwargs, disable=True))


@contextmanager
def transformers_bars(show: bool) -> Iterator[None]:
    """transformers' own progress bars (``Loading weights``) only when ``show``."""
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if show or not hf_logging.is_progress_bar_enabled():
        yield
    elif set_hook is not None:
        previous = set_hook(_hidden)
        try:
            yield
        finally:
            set_hook(previous)
    else:  # transformers without hooks: switch its bars (and the hub's) off and on again
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.enable_progress_bar()


def verbose() -> bool:
    """Whether dymu's info lines are shown (the scripts' ``--verbose``)."""
    return logging.getLogger("dymu").isEnabledFor(logging.INFO)
