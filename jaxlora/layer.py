"""The forward of one targeted dense layer, single active set or mixed batch.

`lora_dense` is the function every integration (the spec chain, Flax, the Llama model) calls.

Example:
    >>> import jax.numpy as jnp, jaxlora
    >>> x, kernel = jnp.ones((2, 3)), jnp.eye(3)
    >>> w = jaxlora.LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 3)), jnp.asarray(0.5))
    >>> jaxlora.lora_dense(x, kernel, None, [w]).tolist()
    [[2.5, 2.5, 2.5], [2.5, 2.5, 2.5]]
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .bank import NO_ADAPTER
from .errors import ShapeMismatchError
from .routing import routed_delta
from .weights import LoraWeights

__all__ = ["add_deltas", "add_routed", "check_fits", "lora_delta", "lora_dense", "lora_dense_mixed"]

Array = jax.Array


def lora_delta(x: Array, w: LoraWeights) -> Array:
    """`((x @ a) @ b) * scale` in the adapter's compute dtype (spec SW-FORWARD-1, SW-DTYPE-1)."""
    dtype = jnp.result_type(x.dtype, w.a.dtype)
    h = x.astype(dtype) @ jnp.asarray(w.a).astype(dtype)
    return (h @ jnp.asarray(w.b).astype(dtype)) * jnp.asarray(w.scale).astype(dtype)


def check_fits(kernel_shape: tuple[int, ...], w: LoraWeights, where: str = "this layer") -> None:
    """Raise `ShapeMismatchError` unless `w` (a `[in, r]`, b `[r, out]`) fits a kernel `[in, out]`.

    Shapes are static, so the check costs nothing at run time (it runs while tracing).

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> check_fits((3, 2), w)
    """
    a_shape, b_shape = tuple(jnp.shape(w.a)), tuple(jnp.shape(w.b))
    fits = (
        len(a_shape) == 2
        and len(b_shape) == 2
        and a_shape[1] == b_shape[0]
        and (a_shape[0], b_shape[1]) == tuple(kernel_shape)
    )
    if not fits:
        raise ShapeMismatchError(
            f"{where}: the kernel is {tuple(kernel_shape)} (in, out) but the LoRA weights are "
            f"a{a_shape} b{b_shape}; expected a (in, r) = ({kernel_shape[0]}, r) and "
            f"b (r, out) = (r, {kernel_shape[-1]}). Was the adapter made for another model, or "
            "are PEFT's [r, in] / [out, r] weights not transposed?"
        )


def _base(x: Array, kernel: Array, bias: Array | None) -> Array:
    y = x @ kernel
    return y if bias is None else y + bias


def lora_dense(
    x: Array,
    kernel: Array,
    bias: Array | None,
    weights: LoraWeights | Sequence[LoraWeights] = (),
) -> Array:
    """`x @ kernel + bias + sum_i scale_i * (x @ a_i) @ b_i` (spec SW-FORWARD-1).

    With no weights the result is exactly the base layer's (SW-ACTIVE-2). Deltas are added in
    order to the base output promoted to the adapters' dtype, and the sum is cast back to the
    base output's dtype once (SW-DTYPE-1).

    Arguments:
        x: `[..., in]`.
        kernel: `[in, out]`.
        bias: `[out]` or None.
        weights: one `LoraWeights` or a sequence (the active adapters present at this layer).
    """
    y = _base(x, kernel, bias)
    if isinstance(weights, LoraWeights):
        weights = (weights,)
    if not weights:
        return y
    for w in weights:
        check_fits(tuple(kernel.shape), w)
    return add_deltas(y, [lora_delta(x, w) for w in weights])


def add_deltas(y: Array, deltas: Sequence[Array]) -> Array:
    """SW-DTYPE-1: `y` promoted to the deltas' dtype, the deltas added in order, the sum cast
    back to `y`'s dtype once.

    Example:
        >>> import jax.numpy as jnp
        >>> add_deltas(jnp.ones(2, jnp.bfloat16), [jnp.full(2, 0.5)]).dtype
        dtype(bfloat16)
    """
    acc = y.astype(jnp.result_type(y.dtype, *(d.dtype for d in deltas)))
    for d in deltas:
        acc = acc + d
    return acc.astype(y.dtype)


def lora_dense_mixed(
    x: Array,
    kernel: Array,
    bias: Array | None,
    stacked: LoraWeights,
    ids: Array,
    *,
    method: str = "auto",
) -> Array:
    """A dense layer whose rows use different adapters (spec SW-MIXED-1).

    Arguments:
        x: `[batch, ..., in]`.
        kernel, bias: the base layer.
        stacked: slot-major weights (`a [S, in, R]`, `b [S, R, out]`, `scale [S]`).
        ids: `[batch]` int slot ids; `jaxlora.NO_ADAPTER` (-1) rows get the base output exactly.
        method: the routing kernel, see `jaxlora.routing.routed_delta`.
    """
    ids = jnp.asarray(ids)
    y = _base(x, kernel, bias)
    return add_routed(y, routed_delta(x, stacked, ids, method=method), ids)


def add_routed(y: Array, delta: Array, ids: Array) -> Array:
    """Add a mixed batch's per-row delta to the base output `y` (SW-DTYPE-1, SW-MIXED-1).

    `y` is promoted to the delta's dtype, the delta added and the sum cast back once; rows whose
    id is `NO_ADAPTER` are `y` exactly. Every mixed-batch integration (the chain, Flax, the
    Llama model) goes through here.

    Example:
        >>> import jax.numpy as jnp
        >>> add_routed(jnp.ones((2, 3)), jnp.full((2, 3), 0.5), jnp.asarray([0, -1]))[:, 0].tolist()
        [1.5, 1.0]
    """
    ids = jnp.asarray(ids)
    acc = (y.astype(jnp.result_type(y.dtype, delta.dtype)) + delta).astype(y.dtype)
    none = (ids == NO_ADAPTER).reshape(ids.shape + (1,) * (y.ndim - 1))
    return jnp.where(none, y, acc)
