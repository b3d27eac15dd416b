"""Grouped-query attention over a slot-contiguous, heads-major KV cache updated in place.

Each cache row owns one region `[kv_heads, max_len, head_dim]` of every layer's key and value
arrays (`[rows, kv_heads, max_len, head_dim]`, one array per layer, never stacked). The token a
batch row feeds at position `p` is written to slot `p` of its cache row (a scatter into the
donated buffer: XLA updates it in place, no copy of the cache) and attends to slots `0..p` of
that row. A row's tokens therefore sit contiguously from slot 0: no left padding in the cache,
no per-slot validity mask. Stale slots beyond a row's position are never visible (their
scores are masked), but their values still enter `probs @ values` with probability 0, and
0 * NaN is NaN: the engine clears a row's values when it admits a new request into it
(`clear_rows`, in its first prefill call; spec SW-ENGINE-10). Heads-major is the layout
that measured best for the decode read (`benchmarks/decode.py` also times the slot-major
`[rows, max_len, kv_heads, head_dim]` layout: XLA:CPU then transposes the whole cache into the
batched dot every step, spec SW-ENGINE-6).

Example:
    >>> import jax.numpy as jnp
    >>> cache = jnp.zeros((2, 1, 4, 2))  # 2 rows, 1 kv head, 4 slots, head_dim 2
    >>> where = locate(jnp.asarray([[0], [2]]), max_len=4)
    >>> new = write(cache, jnp.ones((2, 1, 1, 2)), where)
    >>> new[:, 0, :, 0].tolist()
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Where", "attend", "cache_bytes", "clear_rows", "locate", "write"]

Array = jax.Array


class Where(NamedTuple):
    """Where a batch of tokens goes in the cache and what each token sees.

    Arguments:
        rows: `[B]` the cache row of each batch row, or None when batch row `b` is cache row
            `b` (the decode step over the whole pool: no gather of the cache).
        slots: `[B, T]` the slot each token is written to; `max_len` for a token that is not
            written (padding): the scatter drops it.
        positions: `[B, T]` each token's position in its row (its slot; -1 for padding).
    """

    rows: Array | None
    slots: Array
    positions: Array


def locate(positions: Array, max_len: int, rows: Array | None = None) -> Where:
    """`Where` for tokens at `positions [B, T]` (-1 or >= `max_len`: padding, not written)."""
    positions = jnp.asarray(positions, jnp.int32)
    written = (positions >= 0) & (positions < max_len)
    return Where(rows, jnp.where(written, positions, max_len), jnp.where(written, positions, -1))


def write(cache: Array, new: Array, where: Where) -> Array:
    """`cache [N, kv_heads, L, D]` with `new [B, T, kv_heads, D]` written at `where` (in place).

    Tokens whose slot is `L` (padding) and batch rows whose cache row is `N` are dropped.
    Without `where.rows` (batch row `b` is cache row `b`) the write is a scatter batched over
    rows (`vmap`), which XLA knows stays inside each row: on a mesh whose data axis splits the
    rows it needs no communication.
    """
    new = new.astype(cache.dtype)
    if where.rows is None:
        return jax.vmap(_write_row)(cache, new, where.slots)
    b, t = where.slots.shape
    rows = jnp.broadcast_to(where.rows[:, None], (b, t))
    return cache.at[rows, :, where.slots, :].set(new, mode="drop")


def _write_row(cache: Array, new: Array, slots: Array) -> Array:
    """One row: `cache [kv_heads, L, D]` with `new [T, kv_heads, D]` at `slots [T]`."""
    return cache.at[:, slots, :].set(jnp.swapaxes(new, 0, 1), mode="drop")


def clear_rows(cache: Array, rows: Array) -> Array:
    """`cache [N, ...]` with rows `rows [P]` set to zero (in place; a row `N` is dropped).

    Example:
        >>> clear_rows(jnp.ones((3, 2)), jnp.asarray([2, 3])).tolist()
        [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    """
    return cache.at[rows].set(jnp.zeros((), cache.dtype), mode="drop")


def _rows_of(cache: Array, where: Where) -> Array:
    if where.rows is None:
        return cache
    return jnp.take(cache, where.rows, axis=0, mode="clip")


def attend(
    q: Array,
    k: Array,
    v: Array,
    k_cache: Array,
    v_cache: Array,
    where: Where,
    window: int | None = None,
) -> tuple[Array, Array, Array]:
    """Write `k`, `v` into the caches and attend `q` over each row's visible slots.

    Arguments:
        q: `[B, T, heads, D]` (RoPE applied).
        k, v: `[B, T, kv_heads, D]` (RoPE applied to `k`).
        k_cache, v_cache: `[N, kv_heads, L, D]`, donated by the caller's jit.
        where: the tokens' cache rows, slots and positions (`locate`).
        window: a sliding window (Mistral / Qwen): a token sees at most the `window` latest
            positions, itself included (transformers' rule; positions are slots here).

    Returns:
        `(out [B, T, heads * D], k_cache, v_cache)`; token `(b, t)` attends to slots
        `0..positions[b, t]` of its row (causal; a padding token sees nothing, its output is
        finite and meaningless).
    """
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    k_cache = write(k_cache, k, where)
    v_cache = write(v_cache, v, where)
    keys, values = _rows_of(k_cache, where), _rows_of(v_cache, where)
    if keys.dtype != q.dtype:  # a low-precision cache: upcast once, then the dots run in q's dtype
        keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    qg = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bkld->bkgtl", qg, keys)
    scores = scores.astype(jnp.float32) * (d**-0.5)
    slot = jnp.arange(keys.shape[2])[None, None, :]
    visible = slot <= where.positions[:, :, None]  # [B, T, L]
    if window is not None:
        visible = visible & (slot > where.positions[:, :, None] - window)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgtl,bkld->btkgd", probs, values)
    return out.reshape(b, t, heads * d), k_cache, v_cache


def cache_bytes(layers: int, rows: int, max_len: int, kv_heads: int, head_dim: int, dtype: Any):
    """Bytes of a KV cache: `2 * layers * rows * kv_heads * max_len * head_dim * itemsize`.

    Example:
        >>> cache_bytes(4, 32, 256, 8, 64, jnp.float32)
        134217728
    """
    return 2 * layers * rows * kv_heads * max_len * head_dim * jnp.dtype(dtype).itemsize
