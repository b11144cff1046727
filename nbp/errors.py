"""Errors a person can act on: the CLI prints them as one line and exits non-zero."""


class NbpError(RuntimeError):
    """A problem with input (file, data, checkpoint) that the user can fix; exit code 1."""


class NotBuiltError(NbpError):
    """A stage or command that is declared but not implemented yet; exit code 3."""
