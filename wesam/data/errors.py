"""Error type for bad or unreadable dataset content."""

from __future__ import annotations

import os

from wesam.errors import WesamError


class DataError(WesamError, ValueError):
    """A dataset file is missing, unreadable or inconsistent.

    The message always starts with the offending file path so that a failure
    deep inside a long evaluation run can be traced to one file on disk.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    kind = "invalid_data"
