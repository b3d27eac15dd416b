"""Mixed-batch routing kernels: `delta[i] = scale[id_i] * (x[i] @ a[id_i]) @ b[id_i]`.

Rows whose id is `NO_ADAPTER` (-1) get an exact zero delta and use no slot (spec SW-MIXED-1,
SW-ROUTE-1). Three kernels compute the same value (SW-ROUTE-2):

- `"gather"`: gathers each row's factors (`a[ids]`: `[B, in, R]`) and contracts per row.
  Memory `B * (in + out) * R`; FLOPs `B * T * (in + out) * R` (`T` tokens per row).
- `"onehot"`: two matmuls, shrink `x -> [B, ..., S * R]` against every slot at once (`a` laid
  out `[in, S * R]`), masked by a one-hot of the ids times the scale, then expand against `b`
  as `[S * R, out]`; no per-row weights exist at any point. FLOPs `S` times those of gather;
  best when the slot count is small.
- `"ragged"`: sorts rows by id, runs `jax.lax.ragged_dot` for shrink and expand with per-slot
  group sizes, and unsorts. Sentinel rows are sorted last and appended to the last slot's group
  (so no extra slot exists), then masked to an exact zero.

`routing="auto"` picks from static shapes only (SW-ROUTE-3). The rule comes from two
measurements on the project's shared 2-core CPU (jax 0.10.2, float32). One jitted call per
kernel, `python -m benchmarks.routing_choice` (in = out = 256, R = 8, median ms of 20 calls; the
`onehot` column includes its per-call copy of the bank, see `_finite_slots`):

    B x T     S   gather  onehot  ragged
    8 x 1     4     0.08    0.06    0.15
    8 x 1     8     0.03    0.09    0.11
    8 x 1    16     0.09    0.14    0.19
    64 x 1    4     0.26    0.07    0.18
    64 x 1    8     0.17    0.12    0.32
    64 x 1   16     0.18    0.16    0.67
    64 x 1   32     0.26    0.61    1.49
    64 x 1   64     0.24    0.86    2.49
    8 x 16    4     0.08    0.13    0.22
    8 x 128   4     0.29    0.63    1.08
    8 x 128  16     0.31    1.68    3.35

and the engine's decode call on the e2e model (hidden 512, 4 layers, rank 16 on all 7
projections, 32 rows, 31 steps in one call, the bank copy hoisted out of the loop): 8 slots,
onehot 0.47 s vs gather 0.51 s; 16 slots, onehot 0.61 s vs gather 0.52 s (BENCHMARKS.md,
Engine). So: `onehot` when rows hold one token (`T == 1`, decoding) and `S <= 8` (its `S`-fold
extra FLOPs cost less than gathering `B` copies of the factors), else `gather`. Single calls of
very few rows are dominated by dispatch (the 8-row lines vary run to run). `ragged` never wins
on CPU (XLA:CPU has no grouped matmul); it is offered for accelerators, where `ragged_dot` is a
grouped matmul. Re-run both on the target hardware before relying on the rule there.

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
ONEHOT_MAX_SLOTS = 8


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
    # Shrink against every slot as ONE matmul with `a` laid out `[in, S * R]` (slot-major
    # columns). The transpose is fused into the copy `_finite_slots` writes anyway, and inside
    # a multi-step decode loop XLA hoists both out of the loop (the bank is loop-invariant):
    # 472 vs 512 ms for 31 steps of 32 rows x 8 slots against the slot-batched form it
    # replaced (BENCHMARKS.md, Engine).
    flat_a = jnp.transpose(stacked.a.astype(dtype), (1, 0, 2)).reshape(d_in, slots * rank)
    h = x.astype(dtype) @ flat_a  # [B, ..., S * R]
    h = h.reshape((*h.shape[:-1], slots, rank))
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
