"""Mixed-batch routing kernels: `delta[i] = scale[id_i] * (x[i] @ a[id_i]) @ b[id_i]`.

Rows whose id is `NO_ADAPTER` (-1) get an exact zero delta and use no slot (spec SW-MIXED-1).

Example:
    >>> import jax.numpy as jnp, jaxlora
    >>> st = jaxlora.LoraWeights(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 3)), jnp.asarray([1.0, 2.0]))
    >>> routed_delta(jnp.ones((3, 3)), st, jnp.asarray([0, 1, -1]))[:, 0].tolist()
    [3.0, 6.0, 0.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import ConfigError
from .weights import LoraWeights

__all__ = ["METHODS", "routed_delta"]

Array = jax.Array

METHODS = ("auto", "gather")


def _gather(x: Array, stacked: LoraWeights, ids: Array) -> Array:
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)
    dtype = jnp.result_type(x.dtype, stacked.a.dtype)
    a = stacked.a[safe].astype(dtype)  # [B, in, R]
    b = stacked.b[safe].astype(dtype)  # [B, R, out]
    scale = jnp.where(valid, stacked.scale[safe], 0).astype(dtype)  # [B]
    h = jnp.einsum("b...i,bir->b...r", x.astype(dtype), a)
    d = jnp.einsum("b...r,bro->b...o", h, b)
    d = d * scale.reshape(scale.shape + (1,) * (d.ndim - 1))
    mask = valid.reshape(valid.shape + (1,) * (d.ndim - 1))
    return jnp.where(mask, d, jnp.zeros((), dtype))


def routed_delta(x: Array, stacked: LoraWeights, ids: Array, *, method: str = "auto") -> Array:
    """The per-row LoRA delta of a mixed batch.

    Arguments:
        x: `[batch, ..., in]`.
        stacked: `a [S, in, R]`, `b [S, R, out]`, `scale [S]`.
        ids: `[batch]` int slot ids, -1 for no adapter.
        method: `"gather"`, or `"auto"` (picks from the shapes).
    """
    if method not in METHODS:
        raise ConfigError(f"unknown routing method {method!r}; choose one of {METHODS}.")
    return _gather(x, stacked, ids)
