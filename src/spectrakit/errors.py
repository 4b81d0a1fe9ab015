"""The one exception type spectrakit raises for user errors."""

from __future__ import annotations


class SpectrakitError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, a bad option.

    The message is one line that names the tensor, file or option at fault, so the
    command-line tool can print it as is, without a traceback.
    """


class NonFiniteError(SpectrakitError):
    """A tensor holds NaN or Inf values (a :class:`SpectrakitError`, so callers that
    only report errors need not know it; callers that skip such tensors can catch it)."""


class SpectrakitWarning(UserWarning):
    """Something was accepted but probably not what was meant (a fixed ``xmin`` outside a
    spectrum, two unrelated models compared, conv layers left out): the work went on, and
    the message says what happened. The command line prints it as one
    ``spectrakit: warning: …`` line."""
