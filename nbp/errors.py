"""Errors a person can act on: the CLI prints them as one line and exits non-zero."""


class NbpError(RuntimeError):
    """A problem with input (file, data, checkpoint) that the user can fix; exit code 1."""


class NotBuiltError(NbpError):
    """A stage or command that is declared but not implemented yet; exit code 3."""


def say(line: str, stream=None) -> None:
    """``line`` and its newline in one write (stderr by default), then flushed.

    Under ``PYTHONUNBUFFERED`` (clusters and CI set it) ``print`` writes the text and the newline separately, so the
    lines of ranks that fail together interleave mid-line on the shared stderr; one write of a short line to a pipe is
    atomic.
    """
    import sys

    stream = sys.stderr if stream is None else stream
    stream.write(line + "\n")
    stream.flush()
