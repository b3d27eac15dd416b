"""Errors the engine raises on submission, each with the HTTP status a server answers it with.

They derive from `jaxlora.errors.ConfigError` (so `JaxLoraError` and `ValueError`).

Example:
    >>> RequestTooLargeError("too long").status
    413
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["EngineStoppedError", "QueueFullError", "RequestTooLargeError"]


class RequestTooLargeError(ConfigError):
    """`prompt + max_new_tokens` above the engine's `max_len`, or too many stop tokens (413)."""

    status = 413


class QueueFullError(ConfigError):
    """The engine already holds `max_waiting` requests that wait for a row (503, retry later)."""

    status = 503


class EngineStoppedError(ConfigError):
    """The engine was stopped before the request ended (503)."""

    status = 503
