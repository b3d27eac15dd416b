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

from ..types import Routed
from .sampling import SamplingRows, sample

__all__ = ["Steps", "compile_counts", "for_model"]


def _lora(bank, fixed, ids):
    if bank is not None:
        return Routed(bank, ids)
    return fixed


def _rows(ints, floats, first: int) -> SamplingRows:
    seed = jax.lax.bitcast_convert_type(ints[:, first + 1], jnp.uint32)
    return SamplingRows(floats[:, 0], ints[:, first], floats[:, 1], seed, ints[:, first + 2])


def _decode(graphdef, state, cache, bank, fixed, ints, floats, routing):
    model = nnx.merge(graphdef, state)
    positions = ints[:, 1:2]
    logits, cache = model.run(
        ints[:, :1], cache, None, _lora(bank, fixed, ints[:, 2]), routing, positions=positions
    )
    tokens, logprobs = sample(logits[:, 0], _rows(ints, floats, 3))
    return tokens, logprobs, cache


def _prefill(graphdef, state, cache, bank, fixed, tokens, ints, floats, routing):
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


class Steps(NamedTuple):
    """The jitted `decode(state, cache, bank, fixed, ints, floats, *, routing)` and
    `prefill(state, cache, bank, fixed, tokens, ints, floats, *, routing)` of one model
    structure (`graphdef`), the cache donated.

    - decode: one token for every row: `(tokens [R], logprobs [R], cache)`.
    - prefill: one chunk for up to `P` rows: `(first tokens [P], logprobs [P], cache)`; the
      token is meaningful only for rows whose prompt ends in this chunk.
    """

    decode: Any  # jitted functions (`jax.jit` objects: callable, with `_cache_size`)
    prefill: Any


@functools.cache
def for_model(graphdef) -> Steps:
    """The `Steps` of models with this graph definition (one pair per structure, shared by all
    engines: the graph definition is hashed once per engine, not once per call)."""
    jit = functools.partial(jax.jit, static_argnames=("routing",), donate_argnames=("cache",))
    made = Steps(
        jit(functools.partial(_decode, graphdef)), jit(functools.partial(_prefill, graphdef))
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
