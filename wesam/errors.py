"""One base class for every error wesam raises on purpose (PEFT's and BentoML's pattern).

An error carries a stable ``kind``; each protocol maps kinds to its own codes in one place:
exit codes in :mod:`wesam.cli`, HTTP statuses in :mod:`wesam.service.errors`, gRPC codes in
:mod:`wesam.service.grpc_server`. Subclasses keep their historical builtin base
(``ValueError``/``RuntimeError``) so that callers catching those keep working.
"""

from __future__ import annotations


class WesamError(Exception):
    """Something wesam refuses or cannot do, with a message meant for a person.

    ``kind`` names the failure for machines (metrics labels, error bodies, exit codes).
    """

    kind: str = "error"

    def __init__(self, message: str = "", *, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


class ConfigError(WesamError, ValueError):
    """A configuration value or command-line argument is missing or malformed."""

    kind = "config"


class Interrupted(WesamError):
    """A long job stopped on request (Ctrl-C) after saving what it could."""

    kind = "interrupted"
