"""One exception hierarchy for jaxlora.

Every error jaxlora raises on bad input derives from [`JaxLoraError`][] and also from the
built-in class a Python user would expect (`KeyError`, `ValueError`, ...), so both
`except jaxlora.errors.JaxLoraError` and `except KeyError`-style handlers work. Messages name
the adapter, the layer path and the shapes involved, list what exists, and say how to fix it.

Example:
    >>> import jaxlora
    >>> try:
    ...     jaxlora.select(jaxlora.AdapterBank(), "missing")
    ... except jaxlora.errors.AdapterNotFoundError as e:
    ...     print(type(e).__name__)
    AdapterNotFoundError
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "CheckpointError",
    "ConfigError",
    "JaxLoraError",
    "NonFiniteError",
    "ShapeMismatchError",
    "TargetNotFoundError",
    "UnsupportedFeatureError",
]


class JaxLoraError(Exception):
    """Base class of every jaxlora error."""

    def __str__(self) -> str:  # LookupError subclasses would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterNotFoundError(JaxLoraError, KeyError):
    """A name was asked for that the bank does not hold.

    A `KeyError` (hence a `LookupError`), so `Mapping` methods such as `get` and `in` work.
    """


class AdapterExistsError(JaxLoraError, ValueError):
    """`add` was called with a name the bank already holds."""


class ShapeMismatchError(JaxLoraError, ValueError):
    """Array shapes do not fit together (adapter vs layer, A vs B, config vs weights)."""


class TargetNotFoundError(JaxLoraError, LookupError):
    """An adapter targets a layer path that the model parameters do not have."""


class ConfigError(JaxLoraError, ValueError):
    """An argument or configuration value is invalid (rank <= 0, unknown method, ...)."""


class AdapterFormatError(JaxLoraError, ValueError):
    """A file or directory is not a valid adapter (missing, truncated, corrupt, inconsistent)."""


class CheckpointError(JaxLoraError, ValueError):
    """A model checkpoint directory is missing files or holds tensors that do not fit its config."""


class UnsupportedFeatureError(JaxLoraError, NotImplementedError):
    """A feature is valid in PEFT but not supported by jaxlora; refused, never ignored."""


class NonFiniteError(JaxLoraError, FloatingPointError):
    """NaN or Inf was found where `safe=True` asked for finite values."""


def format_names(names: Iterable[str], limit: int = 20) -> str:
    """Render a list of names for an error message: `'a', 'b'` or `(none)`."""
    names = list(names)
    if not names:
        return "(none)"
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")
