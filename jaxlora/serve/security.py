"""Safe defaults for the server (spec SW-SEC-*): who may call what, from where, on which files.

`Policy` is the server's security configuration; `SecurityMiddleware` applies it to every
request before any route runs, in this order:

1. **Host allow-list** (DNS rebinding): the `Host` header's name must be one of
   `policy.allowed_hosts` (default: `localhost`, `127.0.0.1`, `::1`; `*` allows any), else 403.
2. **API key**: with `policy.api_key` set, every endpoint needs `Authorization: Bearer KEY`
   (as OpenAI and vLLM), else 401.
3. **Cross-origin browser requests** (CSRF): a request that may change state (any method but
   GET, HEAD, OPTIONS) is refused with 403 when it carries an `Origin` whose host is not
   allowed (or `Origin: null`) or `Sec-Fetch-Site: cross-site`, and with 415 when it has a
   body that is not `application/json`: no HTML form or `text/plain` "simple request" can
   reach a route, and a real JSON request from another origin needs a CORS preflight that
   this server never grants.
4. **Admin endpoints** (loading and unloading adapters) are refused with 403 unless a key is
   set (and was sent) or `policy.allow_unauthenticated_admin` is on. `is_admin(scope)` tells a
   route whether the caller may see admin-only data (adapter source paths).

`resolve_under_root` confines runtime loads to an adapter root, and `decode_header_name`
reads a UTF-8 adapter name from a header (RFC 8187 `UTF-8''` percent-encoding, or raw UTF-8).

Example:
    >>> policy = Policy()
    >>> policy.host_allowed("127.0.0.1:8000"), policy.host_allowed("evil.example")
    (True, False)
    >>> decode_header_name("UTF-8''%C3%BCn%C3%AF%E2%98%83")
    'ünï☃'
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .errors import (
    AuthenticationError,
    BadRequestError,
    ForbiddenError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "ADMIN_PATHS",
    "LOCAL_HOSTS",
    "Policy",
    "SecurityMiddleware",
    "decode_header_name",
    "error_body",
    "is_admin",
    "resolve_under_root",
]

#: The Host names allowed by default: the loopback names.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STATE_KEY = "jaxlora_admin"


#: The endpoints that change which adapters are served.
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})


def _hostname(value: str) -> str:
    """`host[:port]` or `[v6]:port` -> the lowercased name without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The security configuration (see the module docstring).

    Arguments:
        api_key: the Bearer key every request must send (None: no key).
        allow_unauthenticated_admin: allow admin endpoints without a key (explicit opt-in).
        allowed_hosts: Host names accepted (`*`: any; ports are ignored).
    """

    api_key: str | None = None
    allow_unauthenticated_admin: bool = False
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "allowed_hosts", tuple(_hostname(h) for h in self.allowed_hosts))
        if self.api_key is not None and (not self.api_key or not self.api_key.isprintable()):
            raise BadRequestError("--api-key must be a non-empty printable string.")

    def host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        return "*" in self.allowed_hosts or _hostname(host) in self.allowed_hosts

    def key_ok(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def admin_allowed(self) -> bool:
        """Whether a request that passed the key check may use admin endpoints."""
        return self.api_key is not None or self.allow_unauthenticated_admin

    def check(self, method: str, path: str, headers: dict[str, str], has_body: bool) -> None:
        """Raise the error a request with these headers is refused with (nothing if allowed)."""
        host = headers.get("host")
        if not self.host_allowed(host):
            raise ForbiddenError(
                f"Host {host!r} is not allowed (DNS-rebinding protection); allowed: "
                f"{', '.join(self.allowed_hosts)}. Start the server with --allowed-host NAME to "
                "accept another name."
            )
        if not self.key_ok(headers.get("authorization")):
            raise AuthenticationError(
                "this server needs an API key: send the header `Authorization: Bearer KEY` "
                "(the openai client: api_key=KEY)."
            )
        if method not in _SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None:
                parsed = urllib.parse.urlsplit(origin)
                if origin.strip() == "null" or not self.host_allowed(parsed.netloc):
                    raise ForbiddenError(
                        f"cross-origin request from {origin!r} refused: this server does not "
                        "accept state-changing requests from web pages of other origins."
                    )
            if headers.get("sec-fetch-site", "").lower() == "cross-site":
                raise ForbiddenError("cross-site request refused (Sec-Fetch-Site: cross-site).")
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if (method in _BODY_METHODS or has_body) and media != "application/json":
                raise UnsupportedMediaTypeError(
                    f"the body must be sent as `Content-Type: application/json`, got "
                    f"{media or 'none'!r}."
                )
        if path in ADMIN_PATHS and not self.admin_allowed():
            raise ForbiddenError(
                f"{method} {path} is an admin endpoint and this server has no API key: start it "
                "with --api-key KEY (and send the key) or, on a trusted machine, "
                "--allow-unauthenticated-admin."
            )


def error_body(status: int, message: str, kind: str, param: str | None) -> dict:
    """The JSON error body of every route: OpenAI's shape (spec SW-OAI-7)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def is_admin(scope: Any) -> bool:
    """Whether the request (its ASGI scope, or a Starlette `Request`) may see admin data."""
    state = getattr(scope, "scope", scope).get("state", {})
    return bool(state.get(_STATE_KEY, False))


class SecurityMiddleware:
    """An ASGI middleware applying `policy` to every HTTP request (module docstring)."""

    def __init__(self, app: Callable, policy: Policy, on_refused: Callable | None = None):
        self.app, self.policy, self.on_refused = app, policy, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        has_body = headers.get("content-length", "0") not in ("", "0") or (
            "transfer-encoding" in headers
        )
        try:
            self.policy.check(scope["method"], scope["path"], headers, has_body)
        except (ForbiddenError, AuthenticationError, UnsupportedMediaTypeError) as err:
            if self.on_refused is not None:
                self.on_refused(scope["path"], err.status)
            body = json.dumps(error_body(err.status, str(err), err.kind, None)).encode()
            extra = [(b"www-authenticate", b"Bearer")] if err.status == 401 else []
            await send(
                {
                    "type": "http.response.start",
                    "status": err.status,
                    "headers": [(b"content-type", b"application/json"), *extra],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return None
        scope.setdefault("state", {})[_STATE_KEY] = self.policy.admin_allowed()
        return await self.app(scope, receive, send)


def decode_header_name(value: str) -> str:
    """An adapter name from a header value (spec SW-SEC-6).

    `UTF-8''` followed by percent-encoded UTF-8 (RFC 8187's ext-value, the charset
    case-insensitive) is decoded; any other value is taken as the header's raw bytes in
    UTF-8 (HTTP servers hand them over as Latin-1). Invalid UTF-8 is a `BadRequestError`.
    """
    charset, sep, rest = value.partition("''")
    try:
        if sep and charset.lower() == "utf-8":
            return urllib.parse.unquote(rest, encoding="utf-8", errors="strict")
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeError, ValueError):
        raise BadRequestError(
            "the adapter name header is not valid UTF-8; send the name as UTF-8 or as "
            "UTF-8''<percent-encoded> (RFC 8187)."
        ) from None


_OUTSIDE = (
    "the adapter path must be a relative path to a directory inside the server's adapter "
    "root (no '..', no absolute path, no link out of the root)"
)


def resolve_under_root(root: str | os.PathLike, requested: Any) -> Path:
    """The directory `requested` names under `root`, or `ForbiddenError` (spec SW-SEC-5).

    `requested` is relative to `root`; `..` components, absolute paths (POSIX or Windows) and
    symbolic links that lead out of the root are refused with one message that says nothing
    of whether the path exists. Inside the root, a missing directory is reported as such.
    """
    if not isinstance(requested, str) or not requested.strip() or "\x00" in requested:
        raise BadRequestError("the adapter path must be a non-empty string.", param="lora_path")
    parts: Iterable[str] = PurePosixPath(requested.replace("\\", "/")).parts
    absolute = PurePosixPath(requested).is_absolute() or PureWindowsPath(requested).is_absolute()
    if absolute or PureWindowsPath(requested).drive or ".." in parts:
        raise ForbiddenError(f"{_OUTSIDE}; got {requested!r}.")
    base = Path(root).resolve()
    target = (base / requested).resolve()
    if not target.is_relative_to(base):
        raise ForbiddenError(f"{_OUTSIDE}; got {requested!r}.")
    if not target.is_dir():
        raise BadRequestError(
            f"there is no adapter directory {requested!r} under the adapter root.",
            param="lora_path",
        )
    return target
