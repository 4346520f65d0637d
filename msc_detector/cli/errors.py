"""The one exception type the command line turns into a one-line message."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in what the user asked for: a missing folder, a bad list file, an output path.

    The command line prints the message as one line and exits with status 1, without a
    traceback. The message names the offending path or option and, where there is one,
    the fix.
    """
