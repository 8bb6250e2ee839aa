"""The one exception type the tool raises for bad input.

Every user-facing problem (a bad data row, a mask for other weights, an output folder in the
way) is a :class:`CplError` with a one-line message that names the file, row or option and what
is wrong. The CLI prints it and exits with status 2; the Python API lets it propagate.
"""

from __future__ import annotations


class CplError(Exception):
    """A problem with the user's input, described in one line."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
