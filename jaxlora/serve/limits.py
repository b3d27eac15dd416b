"""Request bodies within limits, and typed fields that name themselves (spec SW-LIMIT-*).

`parse_json` refuses, with `BadRequestError` (HTTP 400) and before building anything large,
what would otherwise escape as a 500: nesting deeper than `max_depth` (a `RecursionError`
in the parser), integers or decimals longer than `max_number_chars` (Python refuses to
convert long integers, and a long decimal is a slow one), `NaN` / `Infinity` (not JSON), a
float that overflows to infinity, and NUL characters in any string or key (they end C
strings: file paths, headers, tokenizers). `Fields` reads a JSON object field by field: each
getter checks type and range and names the field in its error, and `finish()` refuses every
field that was not read (an unknown or unsupported field is never silently ignored).

Example:
    >>> fields = Fields(parse_json(b'{"n": 2, "temperature": 0.5}'))
    >>> fields.int("n", 1, lo=1, hi=8), fields.number("temperature", 1.0, lo=0.0)
    (2, 0.5)
    >>> fields.finish()
    >>> parse_json(b'[[[[1]]]]', max_depth=3)
    Traceback (most recent call last):
    ...
    jaxlora.serve.errors.BadRequestError: the JSON body is nested 4 deep, above the limit of 3.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .errors import BadRequestError, RequestTooLargeError, UnsupportedFieldError

__all__ = [
    "MAX_DEPTH",
    "MAX_NUMBER_CHARS",
    "Fields",
    "json_depth",
    "parse_json",
    "read_body",
]

#: The deepest nesting of arrays/objects a request body may have.
MAX_DEPTH = 32
#: The longest number literal (characters) a request body may hold.
MAX_NUMBER_CHARS = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_MISSING = object()


def json_depth(raw: bytes) -> int:
    """The deepest `[`/`{` nesting of `raw` (brackets inside strings do not count)."""
    stripped = np.frombuffer(_STRING.sub(b'""', raw), np.uint8)
    opens = (stripped == ord("[")) | (stripped == ord("{"))
    closes = (stripped == ord("]")) | (stripped == ord("}"))
    if not stripped.size:
        return 0
    return int(np.max(np.cumsum(opens.astype(np.int64) - closes), initial=0))


def _nul_free(value: Any, where: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise BadRequestError(
                f"{where} holds a NUL character (\\u0000); remove it.", param=where.strip("`")
            )
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _nul_free(item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _nul_free(key, f"a key of {where}")
            _nul_free(item, f"`{key}`" if where == "the body" else f"{where}.{key}")


def parse_json(
    raw: bytes, *, max_depth: int = MAX_DEPTH, max_number_chars: int = MAX_NUMBER_CHARS
) -> Any:
    """`raw` as JSON within the limits of the module docstring (`BadRequestError` else)."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise BadRequestError(
            f"the JSON body is nested {depth} deep, above the limit of {max_depth}."
        )

    def number(kind):
        def parse(text: str):
            if len(text) > max_number_chars:
                raise BadRequestError(
                    f"a number in the JSON body has {len(text)} characters, above the limit of "
                    f"{max_number_chars}."
                )
            value = kind(text)
            if isinstance(value, float) and not math.isfinite(value):
                raise BadRequestError(f"the number {text[:20]} overflows a float.")
            return value

        return parse

    def constant(text: str):
        raise BadRequestError(f"{text} is not JSON; send a finite number.")

    try:
        value = json.loads(
            raw, parse_int=number(int), parse_float=number(float), parse_constant=constant
        )
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequestError(f"the body is not valid JSON ({err}).") from None
    except RecursionError:  # defence in depth: json_depth already bounds this
        raise BadRequestError("the JSON body is nested too deeply.") from None
    _nul_free(value, "the body")
    return value


async def read_body(receive_stream: Any, limit: int) -> bytes:
    """The bytes of an ASGI request body (`request.stream()`); `RequestTooLargeError` above
    `limit` (the rest is drained, not kept)."""
    chunks, size = [], 0
    async for chunk in receive_stream:
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise RequestTooLargeError(f"the body is {size} bytes, above the limit of {limit}.")
    return b"".join(chunks)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Fields:
    """Typed, self-naming access to a JSON object (see the module docstring).

    Arguments:
        body: the object.
        where: how errors name it (`the body`, `messages[0]`, ...).
    """

    def __init__(self, body: Any, where: str = "the body"):
        if not isinstance(body, Mapping):
            raise BadRequestError(f"{where} must be a JSON object, got {type(body).__name__}.")
        self.body, self.where = body, where
        self._read: set[str] = set()

    def _name(self, key: str) -> str:
        return key if self.where == "the body" else f"{self.where}.{key}"

    def _error(self, key: str, message: str) -> BadRequestError:
        return BadRequestError(f"`{self._name(key)}` {message}", param=self._name(key))

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as sent (`default` when absent or null)."""
        self._read.add(key)
        value = self.body.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    def has(self, key: str) -> bool:
        return self.body.get(key) is not None

    def int(self, key: str, default: Any, *, lo: int | None = None, hi: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and value is None:
            return None
        if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._error(key, f"must be an int in [{lo}, {hi}], got {value!r}.")
        return value

    def number(
        self, key: str, default: Any, *, lo: float | None = None, hi: float | None = None
    ) -> Any:
        value = self.raw(key, default)
        if value is default and value is None:
            return None
        ok = _is_number(value) and math.isfinite(value)
        if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._error(key, f"must be a number in [{lo}, {hi}], got {value!r}.")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self._error(key, f"must be true or false, got {value!r}.")
        return value

    def str(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise self._error(key, f"must be a string, got {value!r}.")
        return value

    def neutral(self, key: str, *allowed: Any) -> None:
        """Accept `key` only when absent, null or one of `allowed` (values with no effect):
        a field the server does not implement is refused, never ignored."""
        value = self.raw(key)
        if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
            shown = ", ".join(json.dumps(a) for a in allowed) or "null"
            raise UnsupportedFieldError(
                f"`{self._name(key)}` = {json.dumps(value)[:80]} is not supported by this "
                f"server; leave it out (or send {shown}).",
                param=self._name(key),
            )

    def finish(self, also: Iterable[str] = ()) -> None:
        """Refuse every field not read (and not in `also`), naming them."""
        unknown = sorted(set(self.body) - self._read - set(also))
        if unknown:
            names = ", ".join(f"`{self._name(k)}`" for k in unknown)
            raise UnsupportedFieldError(
                f"unknown or unsupported field(s) {names} in {self.where}; this server does "
                "not ignore fields it does not implement. Remove them.",
                param=self._name(unknown[0]),
            )
