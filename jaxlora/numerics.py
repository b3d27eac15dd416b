"""Finite-value checks for adapters: refuse NaN/Inf before a forward or a merge (SW-NUM-2).

An adapter file from a stranger can hold NaN or Inf (a diverged training run, a corrupted
upload). A forward would silently turn every output row that uses it into NaN, and a merge would
poison the base kernel. `check_finite` reduces every factor where it lives, fetches one boolean
per array in a single transfer, and raises `jaxlora.errors.NonFiniteError` naming the adapter,
the layer, the factor and how many values are bad. It returns its argument, so it chains:
`bank = check_finite(jaxlora.io.load_peft(path))`.

Example:
    >>> import jax.numpy as jnp, jaxlora
    >>> from jaxlora.numerics import check_finite
    >>> w = jaxlora.LoraWeights(jnp.ones((2, 1)), jnp.asarray([[jnp.nan, 0.0]]), jnp.asarray(1.0))
    >>> try:
    ...     check_finite({"l0": w}, name="mine")
    ... except jaxlora.errors.NonFiniteError as e:
    ...     print(str(e).split(":")[0])
    adapter 'mine', layer 'l0'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp
import numpy as np

from .errors import ConfigError, NonFiniteError
from .types import Active, LoraWeights, StackedBank

__all__ = ["check_finite", "non_finite_entries"]

T = TypeVar("T")

#: `(adapter name, layer path, factor name, array)` for every floating array to check.
_Entry = tuple[str, str, str, Any]


def _all_finite(arrays: list[Any]) -> np.ndarray:
    """One boolean per array: reduced where the array lives, fetched in one transfer.

    Not jitted on purpose: a bank has thousands of arrays and its structure changes with every
    load, so a compiled version would recompile each time; eager reductions cost one small
    dispatch per array and no copy of the weights.
    """
    return np.asarray(jnp.stack([jnp.all(jnp.isfinite(jnp.asarray(x))) for x in arrays]))


def _weights_entries(name: str, path: str, w: LoraWeights) -> list[_Entry]:
    return [(name, path, field, getattr(w, field)) for field in ("a", "b", "scale")]


def _entries(value: Any, name: str | None) -> list[_Entry]:
    """Flatten the supported containers into named entries, in a stable order."""
    if isinstance(value, LoraWeights):
        return _weights_entries(name or "(unnamed)", "(layer)", value)
    if isinstance(value, StackedBank):
        out = []
        for path, w in value.weights.items():
            for slot, slot_name in enumerate(value.names):
                slot_w = LoraWeights(w.a[slot], w.b[slot], w.scale[slot])
                out.extend(_weights_entries(slot_name, path, slot_w))
        return out
    if isinstance(value, Active):
        return [e for i, ad in enumerate(value.adapters) for e in _entries(ad, f"active #{i}")]
    if isinstance(value, Mapping) and value and all(isinstance(v, Mapping) for v in value.values()):
        # an AdapterBank (or any `name -> adapter` mapping)
        return [e for n in value for e in _entries(value[n], n)]
    if isinstance(value, Mapping):
        out = []
        for path, w in value.items():
            if not isinstance(w, LoraWeights):
                raise ConfigError(
                    f"check_finite: adapter {name or '(unnamed)'!r}, layer {path!r}: expected "
                    f"LoraWeights, got {type(w).__name__}."
                )
            out.extend(_weights_entries(name or "(unnamed)", path, w))
        return out
    raise ConfigError(
        "check_finite takes an AdapterBank, a StackedBank, an adapter (path -> LoraWeights), "
        f"a LoraWeights or a `select(...)` result; got {type(value).__name__}."
    )


def non_finite_entries(value: Any, *, name: str | None = None) -> list[tuple[str, str, str]]:
    """`(adapter, layer path, factor)` of every floating array holding NaN or Inf.

    Arguments:
        value: see `check_finite`.
        name: the adapter name to report when `value` is a single adapter.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> w = jaxlora.LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(jnp.inf))
        >>> non_finite_entries({"l0": w}, name="x")
        [('x', 'l0', 'scale')]
    """
    entries = [
        e for e in _entries(value, name) if jnp.issubdtype(jnp.asarray(e[3]).dtype, jnp.inexact)
    ]
    if not entries:
        return []
    flags = _all_finite([e[3] for e in entries])
    return [e[:3] for e, ok in zip(entries, flags, strict=True) if not ok]


def check_finite(value: T, *, name: str | None = None) -> T:
    """Raise `NonFiniteError` if any factor (`a`, `b`, `scale`) holds NaN or Inf (SW-NUM-2).

    Call it once after loading and before serving or merging; the forward itself never checks
    (that would cost a host sync per call). Needs concrete arrays (not under `jax.jit`).

    Arguments:
        value: an `AdapterBank` (or `name -> adapter` mapping), a `StackedBank`, one adapter
            (`path -> LoraWeights`), one `LoraWeights`, or what `jaxlora.select` returns.
        name: the adapter name to report when `value` is a single adapter or `LoraWeights`.

    Returns:
        `value` itself, unchanged.

    Example:
        >>> import jax.numpy as jnp, jaxlora
        >>> w = jaxlora.LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> check_finite({"l0": w}) is not None
        True
    """
    bad = non_finite_entries(value, name=name)
    if not bad:
        return value
    adapter, path, factor = bad[0]
    array = np.asarray(next(e[3] for e in _entries(value, name) if e[:3] == bad[0]))
    n_nan, n_inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    others = f" ({len(bad) - 1} more non-finite arrays: {bad[1:4]})" if len(bad) > 1 else ""
    raise NonFiniteError(
        f"adapter {adapter!r}, layer {path!r}: factor `{factor}` (shape {array.shape}, "
        f"{array.dtype}) holds {n_nan} NaN and {n_inf} Inf of {array.size} values{others}. "
        "Refusing it before any forward or merge: re-export the adapter from a finite "
        "checkpoint, or remove it from the bank (bank.remove(name))."
    )
