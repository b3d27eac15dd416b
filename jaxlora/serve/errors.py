"""Errors of the serving layer, each carrying the HTTP status it is answered with.

They derive from `jaxlora.errors.ConfigError` (so from `JaxLoraError` and `ValueError`): a
caller of the Python API catches them like any other jaxlora input error.

Example:
    >>> QueueFullError("queue full").status
    503
"""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["NoFreeSlotError", "QueueFullError", "RequestTimeoutError", "RequestTooLargeError"]


class RequestTooLargeError(ConfigError):
    """A prompt, `max_new_tokens` or body above the server's limits (HTTP 413)."""

    status = 413


class QueueFullError(ConfigError):
    """The scheduler holds as many pending requests as it admits (HTTP 503, retry later)."""

    status = 503


class RequestTimeoutError(ConfigError, TimeoutError):
    """A request was not served before its deadline (HTTP 504); it was dropped from the queue."""

    status = 504


class NoFreeSlotError(ConfigError):
    """Every adapter slot is in use (HTTP 409); unload one first."""

    status = 409
