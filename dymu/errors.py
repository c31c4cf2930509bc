"""The exception types the toolkit raises for bad input; the CLI turns them into exit code 2."""

from __future__ import annotations


class DyMUError(ValueError):
    """A user-facing problem (bad name, bad file, bad data), with a one-line message."""


class MissingThresholds(DyMUError):
    """A merging encoder was asked for without thresholds.

    The message gives Python advice; each other interface (command line, LLaVA config)
    words its own with :meth:`advice`, so nobody is told to pass a keyword they cannot.
    """

    PYTHON = ("pass thresholds=FILE", "r_total=0 encodes without merging")

    def __init__(self, name: str, searched: list[str] | None = None) -> None:
        self.name = name
        self.searched = searched
        super().__init__(self.advice(*self.PYTHON))

    def advice(self, how_to_pass: str, without_merging: str) -> str:
        """The one-line message, with an interface's way to pass a file and to not merge."""
        where = f" (looked in {', '.join(self.searched)})" if self.searched else ""
        find = f"`dymu-find-thresholds --model {self.name} --data images.json`"
        if self.searched is None:  # a folder or an instance: no name to look up
            find = "`dymu-find-thresholds` (--hf-model for a transformers folder)"
        return (
            f"no thresholds for {self.name}{where}: find them with {find} and "
            f"{how_to_pass}; {without_merging}"
        )
