"""The engine's two jitted functions: a prefill chunk into some rows, a decode step for all rows.

Both take the KV cache donated (updated in place, spec SW-ENGINE-6) and choose the next token
with `jaxlora.engine.sampling.sample` inside the same executable (no extra dispatch, no host
round trip between logits and token). Per-row inputs arrive packed in one int32 and one
float32 array (two small transfers per call):

- decode `ints [R, 6]`: last token, its position (-1: the row is not decoding, nothing is
  written), adapter slot (-1: base), top_k, seed (uint32 bits), token index; `floats [R, 2]`:
  temperature, top_p.
- prefill `tokens [P, C]`, `ints [P, 7]`: cache row (`R`: padding row, dropped), position of
  the chunk's first token, real tokens in the chunk, adapter slot, top_k, seed, token index.

`lora` is built inside: `Routed(bank, slot ids)` when the engine has a bank, the caller's fixed
selection (`generate(lora=select(...))`), or None. The functions are module-level, so engines
with the same model and shapes share executables (`generate()` builds an engine per call).

Example:
    >>> sorted(compile_counts())
    ['decode', 'prefill']
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..types import Routed
from .sampling import SamplingRows, sample

__all__ = ["compile_counts", "decode", "prefill"]


def _lora(bank, fixed, ids):
    if bank is not None:
        return Routed(bank, ids)
    return fixed


def _rows(ints, floats, first: int) -> SamplingRows:
    seed = jax.lax.bitcast_convert_type(ints[:, first + 1], jnp.uint32)
    return SamplingRows(floats[:, 0], ints[:, first], floats[:, 1], seed, ints[:, first + 2])


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"), donate_argnames=("cache",))
def decode(graphdef, state, cache, bank, fixed, ints, floats, routing):
    """One token for every row: `(tokens [R], logprobs [R], cache)`."""
    model = nnx.merge(graphdef, state)
    positions = ints[:, 1:2]
    logits, cache = model.run(
        ints[:, :1], cache, None, _lora(bank, fixed, ints[:, 2]), routing, positions=positions
    )
    tokens, logprobs = sample(logits[:, 0], _rows(ints, floats, 3))
    return tokens, logprobs, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"), donate_argnames=("cache",))
def prefill(graphdef, state, cache, bank, fixed, tokens, ints, floats, routing):
    """One chunk for up to `P` rows: `(first tokens [P], logprobs [P], cache)`.

    The token is meaningful only for rows whose prompt ends in this chunk.
    """
    model = nnx.merge(graphdef, state)
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    start, n = ints[:, 1:2], ints[:, 2:3]
    positions = jnp.where(t < n, start + t, -1)
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
    first, logprobs = sample(logits[:, 0], _rows(ints, floats, 4))
    return first, logprobs, cache


def compile_counts() -> dict[str, int]:
    """Executables the decode step and the prefill hold (all engines in this process)."""
    return {"decode": decode._cache_size(), "prefill": prefill._cache_size()}
