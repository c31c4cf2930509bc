"""The one exception type the toolkit raises for bad input; the CLI turns it into exit code 2."""


class DyMUError(ValueError):
    """A user-facing problem (bad name, bad file, bad data), with a one-line message."""
