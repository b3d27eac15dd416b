"""Errors of the serving layer, each carrying the HTTP status it is answered with.

They derive from `jaxlora.errors.ConfigError` (so from `JaxLoraError` and `ValueError`): a
caller of the Python API catches them like any other jaxlora input error. `param` names the
request field at fault (OpenAI's `error.param`), when there is one. The engine's submission
errors (`QueueFullError` 503, `RequestTooLargeError` 413, `EngineStoppedError` 503, from
`jaxlora.engine`) are re-exported here: the HTTP layer answers them with their `status`.

Example:
    >>> QueueFullError("queue full").status, RequestTooLargeError("too long").status
    (503, 413)
    >>> UnsupportedFieldError("`logit_bias` is not supported", param="logit_bias").param
    'logit_bias'
"""

from __future__ import annotations

from ..engine.errors import EngineStoppedError as EngineStoppedError
from ..engine.errors import QueueFullError as QueueFullError
from ..engine.errors import RequestTooLargeError as RequestTooLargeError
from ..errors import ConfigError

__all__ = [
    "CLIENT_CLOSED",
    "AuthenticationError",
    "BadRequestError",
    "EngineStoppedError",
    "ForbiddenError",
    "NonFiniteOutputError",
    "QueueFullError",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "UnsupportedFieldError",
    "UnsupportedMediaTypeError",
]


#: nginx's status for "client closed the request": recorded in the metrics, never sent.
CLIENT_CLOSED = 499


class _HTTPError(ConfigError):
    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class BadRequestError(_HTTPError):
    """A malformed request: bad JSON, a field of the wrong type or range (HTTP 400)."""


class UnsupportedFieldError(BadRequestError):
    """A request field this server does not implement, or an unknown one (HTTP 400)."""


class AuthenticationError(_HTTPError):
    """No API key, or a wrong one, where the server requires one (HTTP 401)."""

    status = 401
    kind = "authentication_error"


class ForbiddenError(_HTTPError):
    """Refused by the security policy: Host, Origin, admin-only endpoint (HTTP 403)."""

    status = 403
    kind = "permission_error"


class UnsupportedMediaTypeError(_HTTPError):
    """A request body that is not `application/json` (HTTP 415)."""

    status = 415


class NonFiniteOutputError(_HTTPError):
    """The model's logits for this request held NaN/Inf (its adapter); HTTP 422."""

    status = 422
    kind = "non_finite_output"


class RequestTimeoutError(_HTTPError, TimeoutError):
    """A request was not served before its deadline (HTTP 504); it was dropped from the queue."""

    status = 504
    kind = "timeout"
