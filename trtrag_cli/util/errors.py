"""Errors meant for users: one line saying what is wrong and how to fix it.

Anything that is not a `TrtragError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class TrtragError(Exception):
    """A problem the user can fix; rendered as one line plus an optional hint, exit code 1."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(TrtragError):
    """Bad command-line usage; exit code 2."""

    exit_code = 2


class MissingDependency(TrtragError):
    """An optional package is not installed."""
