"""Mixed-batch routing kernels: `delta[i] = scale[id_i] * (x[i] @ a[id_i]) @ b[id_i]`.

Rows whose id is `NO_ADAPTER` (-1) get an exact zero delta and use no slot (spec SW-MIXED-1,
SW-ROUTE-1). Three kernels compute the same value (SW-ROUTE-2):

- `"gather"`: gathers each row's factors (`a[ids]`: `[B, in, R]`) and contracts per row.
  Memory `B * (in + out) * R`; FLOPs `B * T * (in + out) * R` (`T` tokens per row).
- `"onehot"`: two explicit einsums, shrink `x -> [B, ..., S, R]` against every slot, masked by a
  one-hot of the ids times the scale, then expand; no per-row weights exist at any point.
  FLOPs `S` times those of gather; best when the slot count is small. For few rows (decode)
  the shrink runs as one matmul per slot batched over the slots, reading the stacked `a` in
  its own layout (the plain einsum makes XLA:CPU transpose all of `a` on every call).
- `"ragged"`: sorts rows by id, runs `jax.lax.ragged_dot` for shrink and expand with per-slot
  group sizes, and unsorts. Sentinel rows are sorted last and appended to the last slot's group
  (so no extra slot exists), then masked to an exact zero.

`routing="auto"` picks from static shapes only (SW-ROUTE-3). The rule comes from
`python -m benchmarks.routing_choice` on the project's shared 2-core CPU (jax 0.10.2, float32,
in = out = 256, R = 8, median ms of 20 jitted calls; two runs agreed on every winner):

    B x T     S   gather  onehot  ragged
    8 x 1     4     0.05    0.05    0.08
    8 x 1    16     0.08    0.08    0.16
    64 x 1    4     0.31    0.09    0.15
    64 x 1   16     0.19    0.19    0.50
    64 x 1   32     0.30    0.43    0.61
    64 x 1   64     0.15    0.52    1.27
    8 x 16    4     0.07    0.10    0.21
    8 x 128   4     0.20    0.52    0.86
    8 x 128  16     0.20    1.17    4.27

so: `onehot` when rows hold one token (`T == 1`, decoding) and `S <= 16` (its `S`-fold extra
FLOPs cost less than gathering `B` copies of the factors), else `gather`. `ragged` never wins
on CPU (XLA:CPU has no grouped matmul); it is offered for accelerators, where `ragged_dot` is a
grouped matmul. Re-run the script on the target hardware before relying on the rule there.

Example:
    >>> import jax.numpy as jnp, jaxlora
    >>> st = jaxlora.LoraWeights(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 3)), jnp.asarray([1.0, 2.0]))
    >>> routed_delta(jnp.ones((3, 3)), st, jnp.asarray([0, 1, -1]))[:, 0].tolist()
    [3.0, 6.0, 0.0]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError
from .types import NO_ADAPTER, LoraWeights, Routing

__all__ = ["ROUTINGS", "choose_routing", "routed_delta"]

Array = jax.Array

#: Every value `routing=` takes.
ROUTINGS: tuple[Routing, ...] = ("auto", "gather", "onehot", "ragged")

#: `auto` uses `onehot` for single-token rows up to this many slots (see the module docstring).
ONEHOT_MAX_SLOTS = 16

#: `onehot` runs its shrink batched over the slots when `tokens * slots` is at most this (the
#: input is broadcast to every slot: `tokens * slots * in` elements).
SLOT_BATCHED_MAX = 4096


def _row_mask(valid: Array, ndim: int) -> Array:
    return valid.reshape(valid.shape + (1,) * (ndim - 1))


def _gather(x: Array, stacked: LoraWeights, ids: Array, dtype) -> Array:
    valid = ids >= 0
    safe = jnp.where(valid, ids, 0)
    a = stacked.a[safe].astype(dtype)  # [B, in, R]
    b = stacked.b[safe].astype(dtype)  # [B, R, out]
    scale = jnp.where(valid, stacked.scale[safe], 0).astype(dtype)  # [B]
    h = jnp.einsum("b...i,bir->b...r", x.astype(dtype), a)
    h = h * scale.reshape(scale.shape + (1,) * (h.ndim - 1))
    return jnp.einsum("b...r,bro->b...o", h, b)


def _onehot(x: Array, stacked: LoraWeights, ids: Array, dtype) -> Array:
    slots, d_in, rank = stacked.a.shape
    # one_hot of -1 is an all-zero row: the sentinel selects nothing.
    weight = jax.nn.one_hot(ids, slots, dtype=dtype) * stacked.scale.astype(dtype)  # [B, S]
    a = stacked.a.astype(dtype)
    if math.prod(x.shape[:-1]) * slots <= SLOT_BATCHED_MAX:
        # Few rows (decoding): the shrink as one matmul per slot, batched over the slots,
        # reads each slot's `a [in, R]` in the bank's own layout. The einsum below makes
        # XLA:CPU transpose the whole stacked `a` into `[in, S * R]` first, on every call
        # (2-4x the time of the LoRA matmuls of a 32-row decode step).
        xs = x.astype(dtype).reshape(-1, d_in)
        xb = jnp.broadcast_to(xs[None], (slots, *xs.shape))
        h = jax.lax.dot_general(xb, a, (((2,), (1,)), ((0,), (0,))))  # [S, N, R]
        h = jnp.swapaxes(h, 0, 1).reshape((*x.shape[:-1], slots, rank))
    else:
        h = jnp.einsum("b...i,sir->b...sr", x.astype(dtype), a)
    h = h * weight.reshape(weight.shape[:1] + (1,) * (h.ndim - 3) + weight.shape[1:] + (1,))
    flat = h.reshape((*h.shape[:-2], slots * rank))  # expand: one matmul over (slot, rank)
    return flat @ stacked.b.astype(dtype).reshape(slots * rank, -1)


def _ragged(x: Array, stacked: LoraWeights, ids: Array, dtype) -> Array:
    slots = stacked.a.shape[0]
    batch, tokens = x.shape[0], math.prod(x.shape[1:-1])
    # Sentinel rows sort after every slot and join the last slot's group (no extra slot).
    key = jnp.where(ids >= 0, ids, slots)
    order = jnp.argsort(key, stable=True)
    inverse = jnp.argsort(order)
    counts = jnp.bincount(jnp.minimum(key, slots - 1), length=slots).astype(jnp.int32)
    group_sizes = counts * tokens
    xs = x.astype(dtype)[order].reshape(batch * tokens, x.shape[-1])
    scale = jnp.where(ids >= 0, stacked.scale[jnp.minimum(key, slots - 1)], 0)[order]
    h = jax.lax.ragged_dot(xs, stacked.a.astype(dtype), group_sizes, preferred_element_type=dtype)
    h = h * jnp.repeat(scale.astype(dtype), tokens)[:, None]
    d = jax.lax.ragged_dot(h, stacked.b.astype(dtype), group_sizes, preferred_element_type=dtype)
    return d.reshape((batch, *x.shape[1:-1], d.shape[-1]))[inverse]


_KERNELS = {"gather": _gather, "onehot": _onehot, "ragged": _ragged}


def choose_routing(x_shape: tuple[int, ...], stacked: LoraWeights) -> Routing:
    """The kernel `routing="auto"` uses for these static shapes (spec SW-ROUTE-3).

    Example:
        >>> import jax.numpy as jnp
        >>> st = LoraWeights(jnp.ones((4, 8, 2)), jnp.ones((4, 2, 8)), jnp.ones(4))
        >>> choose_routing((32, 8), st), choose_routing((2, 64, 8), st)
        ('onehot', 'gather')
    """
    tokens = math.prod(x_shape[1:-1])
    slots = stacked.a.shape[0]
    return "onehot" if tokens == 1 and slots <= ONEHOT_MAX_SLOTS else "gather"


def routed_delta(x: Array, stacked: LoraWeights, ids: Array, *, routing: Routing = "auto") -> Array:
    """The per-row LoRA delta of a mixed batch (spec SW-MIXED-1, SW-ROUTE-1..3).

    Arguments:
        x: `[batch, ..., in]`.
        stacked: `a [S, in, R]`, `b [S, R, out]`, `scale [S]`.
        ids: `[batch]` int slot ids, -1 (`jaxlora.NO_ADAPTER`) for no adapter.
        routing: `"gather"`, `"onehot"`, `"ragged"` or `"auto"` (chosen from the shapes).

    The raw kernel: shapes are checked by `jaxlora.lora.check_weights` when it is reached
    through `jaxlora.lora.add_lora` (every model's path); called directly, `x [batch, ..., in]`,
    `stacked` and `ids [batch]` must already fit.

    Returns:
        `[batch, ..., out]` in `promote(x.dtype, a.dtype)`; rows with id -1 are exactly zero.
    """
    if routing not in ROUTINGS:
        raise ConfigError(f"unknown `routing` {routing!r}; choose one of {ROUTINGS}.")
    ids = jnp.asarray(ids)
    if routing == "auto":
        routing = choose_routing(tuple(x.shape), stacked)
    slots = stacked.a.shape[0]
    _check_ids_in_range(ids, slots)
    dtype = jnp.result_type(x.dtype, stacked.a.dtype)
    broken = jnp.zeros(ids.shape, bool)
    if routing != "gather":  # these contract over every slot: a NaN slot would reach all rows
        stacked, finite = _finite_slots(stacked)
        broken = (ids >= 0) & ~finite[jnp.clip(ids, 0, slots - 1)]
    d = _KERNELS[routing](x, stacked, ids, dtype)
    d = jnp.where(_row_mask(ids == NO_ADAPTER, d.ndim), jnp.zeros((), dtype), d)
    # SW-ROUTE-4: under jit an out-of-range id cannot raise; its row turns NaN, never a silent
    # fallback to the base model or to another slot. SW-NUM-3: a non-finite slot's own rows
    # turn NaN and no other row sees it.
    bad = (ids < NO_ADAPTER) | (ids >= slots) | broken
    return jnp.where(_row_mask(bad, d.ndim), jnp.asarray(jnp.nan, dtype), d)


def _finite_slots(stacked: LoraWeights) -> tuple[LoraWeights, Array]:
    """SW-NUM-3 for kernels that contract over every slot (`onehot`, `ragged`, where 0 * NaN is
    NaN): the weights with non-finite slots zeroed, and which slots are finite (`[S]`). One
    reduction over the bank, which those kernels read whole anyway."""
    finite = (
        jnp.all(jnp.isfinite(stacked.a), axis=(1, 2))
        & jnp.all(jnp.isfinite(stacked.b), axis=(1, 2))
        & jnp.isfinite(stacked.scale)
    )
    keep = finite[:, None, None]
    safe = LoraWeights(
        jnp.where(keep, stacked.a, jnp.zeros((), stacked.a.dtype)),
        jnp.where(keep, stacked.b, jnp.zeros((), stacked.b.dtype)),
        jnp.where(finite, stacked.scale, jnp.zeros((), stacked.scale.dtype)),
    )
    return safe, finite


def _check_ids_in_range(ids: Array, slots: int) -> None:
    """Raise for ids outside `[-1, slots)` when they are concrete (outside `jit`)."""
    try:
        concrete = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:  # traced: checked by the NaN rows instead
        return
    bad = concrete[(concrete < NO_ADAPTER) | (concrete >= slots)]
    if bad.size:
        raise ConfigError(
            f"slot ids must be in [-1, {slots}) (-1: no adapter); got "
            f"{sorted(set(bad.tolist()))[:10]}. Build ids with StackedBank.ids(names)."
        )
