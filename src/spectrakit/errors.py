"""The one exception type spectrakit raises for user errors."""

from __future__ import annotations


class SpectrakitError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, a bad option.

    The message is one line that names the tensor, file or option at fault, so the
    command-line tool can print it as is, without a traceback.
    """
