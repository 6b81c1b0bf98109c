"""The one error type for failures a user can fix (bad option, unreadable file, missing weights).

`moebius.cli.main` catches `MoebiusError` once and prints its message to stderr (no traceback
unless `--debug` or MOEBIUS_DEBUG=1), exiting with `exit_code`. Library errors that are also
`ValueError` / `FileNotFoundError` (checkpoints, images, hub) subclass it, so Python callers can
keep catching the built-in types.
"""

from __future__ import annotations


class MoebiusError(Exception):
    """A failure the message explains and the user can fix; the command exits with `exit_code`."""

    exit_code = 2  # the command could not do what was asked (README: exit status 2)


class UsageError(MoebiusError, ValueError):
    """The command cannot start as given (an option, a path); the message says what to change."""


class MissingFileError(MoebiusError, FileNotFoundError):
    """A file the command needs is not there; the message names it and what should be there."""
