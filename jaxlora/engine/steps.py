"""The engine's two jitted functions: a prefill chunk into some rows, decode steps for all rows.

Both take the KV cache donated (updated in place, spec SW-ENGINE-6) and choose the next token
with `jaxlora.engine.sampling.sample` inside the same executable (no extra dispatch, no host
round trip between logits and token). Per-row inputs arrive packed in one int32 and one
float32 array (two small transfers per call):

- decode `ints [R, 7 + W]`: last token, its position (-1: the row is not decoding, nothing is
  written), adapter slot (-1: base), top_k, seed (uint32 bits), token index, tokens the row may
  still generate, then its `W` stop tokens (-1: none); `floats [R, 2]`: temperature, top_p;
  `control [2]`: the most steps to run `n <= block`, and whether to end the call after the
  first step in which a row ends (requests wait for a row, SW-ENGINE-1).
- prefill `tokens [P, C]`, `ints [P, 7]`: cache row (`R`: padding row, dropped), position of
  the chunk's first token, real tokens in the chunk, adapter slot, top_k, seed, token index.

One decode call runs up to `block` steps in a `lax.while_loop` (one executable for any `n`):
each step is the same computation, so a row's tokens do not depend on how many steps a call
runs. On the device a row stops at one of its stop tokens or its last allowed token (its
position becomes -1: it writes nothing more); the host reads the `[block, R]` tokens once per
call. A row's first prefill chunk clears its row of the value cache (SW-ENGINE-10).

`lora` is built inside: `Routed(bank, slot ids)` when the engine has a bank, the caller's fixed
selection (`generate(lora=select(...))`), or None. The functions are module-level, so engines
with the same model structure and shapes share executables (`generate()` builds an engine per
call): `for_model(graphdef)` makes the pair once per model structure.

Example:
    >>> sorted(compile_counts())
    ['decode', 'prefill']
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ..models.attention import clear_rows
from ..types import Routed
from .sampling import SamplingRows, sample

__all__ = ["DECODE_COLUMNS", "Steps", "compile_counts", "for_model"]

#: decode `ints` columns before the stop tokens
DECODE_COLUMNS = 7


def _lora(bank, fixed, ids):
    if bank is not None:
        return Routed(bank, ids)
    return fixed


def _seed(column) -> jax.Array:
    return jax.lax.bitcast_convert_type(column, jnp.uint32)


def _decode(graphdef, state, cache, bank, fixed, ints, floats, control, routing, block):
    model = nnx.merge(graphdef, state)
    rows = ints.shape[0]
    lora = _lora(bank, fixed, ints[:, 2])
    seed, stops = _seed(ints[:, 4]), ints[:, DECODE_COLUMNS:]
    started = ints[:, 1] >= 0
    n, until_end = control[0], control[1] > 0

    def step(carry):
        i, cache, token, position, t, left, live, out, logps = carry
        positions = jnp.where(live, position, -1)[:, None]
        logits, cache = model.run(token[:, None], cache, None, lora, routing, positions=positions)
        sampling = SamplingRows(floats[:, 0], ints[:, 3], floats[:, 1], seed, t)
        new, logp = sample(logits[:, 0], sampling)
        out = out.at[i].set(jnp.where(live, new, -1))
        logps = logps.at[i].set(logp)
        left = left - 1
        live = live & (left > 0) & ~jnp.any(new[:, None] == stops, axis=1)
        return i + 1, cache, new, position + 1, t + 1, left, live, out, logps

    def more(carry):
        i, live = carry[0], carry[6]
        ended = jnp.any(started & ~live)
        return (i < n) & jnp.any(live) & ~(until_end & ended)

    carry = (
        jnp.int32(0),
        cache,
        ints[:, 0],
        ints[:, 1],
        ints[:, 5],
        ints[:, 6],
        started,
        jnp.full((block, rows), -1, jnp.int32),
        jnp.zeros((block, rows), jnp.float32),
    )
    done, cache, *_, out, logps = jax.lax.while_loop(more, step, carry)
    return out, logps, done, cache


def _prefill(graphdef, state, cache, bank, fixed, tokens, ints, floats, routing):
    model = nnx.merge(graphdef, state)
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    start, n = ints[:, 1:2], ints[:, 2:3]
    positions = jnp.where(t < n, start + t, -1)
    # SW-ENGINE-10: a prompt's first chunk clears its row's values (a finished request may have
    # left non-finite ones, and probabilities of 0 on them would still give NaN).
    fresh = jnp.where(ints[:, 1] == 0, ints[:, 0], cache.v[0].shape[0])
    cache = cache._replace(v=tuple(clear_rows(v, fresh) for v in cache.v))
    logits, cache = model.run(
        tokens,
        cache,
        None,
        _lora(bank, fixed, ints[:, 3]),
        routing,
        positions=positions,
        rows=ints[:, 0],
        logits_at=jnp.maximum(ints[:, 2] - 1, 0),
    )
    rows = SamplingRows(floats[:, 0], ints[:, 4], floats[:, 1], _seed(ints[:, 5]), ints[:, 6])
    first, logprobs = sample(logits[:, 0], rows)
    return first, logprobs, cache


class Steps(NamedTuple):
    """The jitted `decode(state, cache, bank, fixed, ints, floats, control, *, routing, block)`
    and `prefill(state, cache, bank, fixed, tokens, ints, floats, *, routing)` of one model
    structure (`graphdef`), the cache donated.

    - decode: up to `block` tokens for every row: `(tokens [block, R] (-1 where a row did not
      decode), logprobs [block, R], steps run, cache)`.
    - prefill: one chunk for up to `P` rows: `(first tokens [P], logprobs [P], cache)`; the
      token is meaningful only for rows whose prompt ends in this chunk.
    """

    decode: Any  # jitted functions (`jax.jit` objects: callable, with `_cache_size`)
    prefill: Any


@functools.cache
def for_model(graphdef) -> Steps:
    """The `Steps` of models with this graph definition (one pair per structure, shared by all
    engines: the graph definition is hashed once per engine, not once per call)."""
    made = Steps(
        jax.jit(
            functools.partial(_decode, graphdef),
            static_argnames=("routing", "block"),
            donate_argnames=("cache",),
        ),
        jax.jit(
            functools.partial(_prefill, graphdef),
            static_argnames=("routing",),
            donate_argnames=("cache",),
        ),
    )
    _MADE.append(made)
    return made


#: every `Steps` made so far, for `compile_counts` (grows with distinct model structures only)
_MADE: list[Steps] = []


def compile_counts() -> dict[str, int]:
    """Executables the decode step and the prefill hold (all engines in this process)."""
    return {
        "decode": sum(m.decode._cache_size() for m in _MADE),
        "prefill": sum(m.prefill._cache_size() for m in _MADE),
    }
