"""Token choice, defined once for every path that generates (spec SW-ENGINE-4).

A request's `SamplingParams` and the index `t` of the token being chosen (0 for the first
token after the prompt) decide everything:

1. `temperature == 0`: the argmax of the logits (the lowest id among ties).
2. Otherwise `z = logits / temperature`; with `top_k > 0` only ids with `z >=` the k-th
   largest `z` stay; with `top_p < 1` only the smallest prefix of the remaining ids, by
   descending `z`, whose probability mass reaches `top_p` stays (ids tied with its last one
   too); the token is `argmax(z + g)` over the ids that stay, `g` Gumbel noise drawn with
   `step_key(seed, t) = fold_in(key(seed), t)`, i.e. `jax.random.categorical(step_key, z)`.

Nothing else enters: not the batch, not the row, not the other requests, so one request gives
the same tokens alone, in `jaxlora.generate` and in the server. The reported log-probability
is `log_softmax(logits)[token]` (temperature 1, unfiltered).

Example:
    >>> import jax.numpy as jnp
    >>> rows = SamplingRows.of([SamplingParams(), SamplingParams(temperature=1.0, seed=3)], [0, 0])
    >>> tokens, _ = sample(jnp.asarray([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]]), rows)
    >>> int(tokens[0])
    1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError

__all__ = ["SEED_LIMIT", "SamplingParams", "SamplingRows", "sample", "step_key"]

Array = jax.Array

#: Seeds are uint32: `[0, SEED_LIMIT)`.
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens (see the module docstring).

    Arguments:
        temperature: 0 for greedy; > 0 samples from `softmax(logits / temperature)`.
        top_k: keep the `top_k` largest logits (0: no limit).
        top_p: keep the smallest set of ids whose probability reaches `top_p` (1: no limit).
        seed: the request's PRNG seed, in `[0, 2**32)`.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab: int) -> None:
        """Raise `ConfigError` naming the field for values outside their ranges."""
        t = self.temperature
        if not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError(
                f"temperature must be a finite number >= 0, got {t!r}; use 0.0 for greedy "
                "decoding or a positive value (with a seed) for sampling."
            )
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= vocab:
            raise ConfigError(f"top_k must be an int in [0, {vocab}] (0: off), got {self.top_k!r}.")
        p = self.top_p
        if not isinstance(p, int | float) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1] (1: off), got {p!r}.")
        if not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be in [0, 2**32) (got {self.seed}); use a 32-bit seed.")


class SamplingRows(NamedTuple):
    """Per-row sampling parameters as arrays: `temperature, top_p` f32, `top_k, step` int32,
    `seed` uint32, each `[rows]`; `step` is the index of the token being chosen."""

    temperature: Array
    top_k: Array
    top_p: Array
    seed: Array
    step: Array

    @classmethod
    def of(cls, params: Sequence[SamplingParams], steps: Sequence[int]) -> SamplingRows:
        """Arrays for `params[i]` choosing token `steps[i]` (host-side helper)."""
        return cls(
            jnp.asarray(np.asarray([p.temperature for p in params], np.float32)),
            jnp.asarray(np.asarray([p.top_k for p in params], np.int32)),
            jnp.asarray(np.asarray([p.top_p for p in params], np.float32)),
            jnp.asarray(np.asarray([p.seed for p in params], np.uint32)),
            jnp.asarray(np.asarray(steps, np.int32)),
        )


def step_key(seed: Array, step: Array) -> Array:
    """The PRNG key of token `step` of a request with `seed`: `fold_in(key(seed), step)`."""
    return jax.random.fold_in(jax.random.key(seed), step)


def _filtered(z: Array, top_k: Array, top_p: Array) -> Array:
    """`z [B, V]` with ids outside each row's top-k / top-p set at -inf."""
    vocab = z.shape[-1]
    ordered = -jnp.sort(-z, axis=-1)  # descending
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    keep = (top_k[:, None] <= 0) | (z >= kth)
    ordered = jnp.where((top_k[:, None] <= 0) | (ordered >= kth), ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the ids ranked above each one
    kept = jnp.sum(before < top_p[:, None], axis=-1)  # >= 1: the top id always stays
    last = jnp.take_along_axis(ordered, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
    keep = keep & ((top_p[:, None] >= 1.0) | (z >= last))
    return jnp.where(keep, z, -jnp.inf)


def sample(logits: Array, rows: SamplingRows) -> tuple[Array, Array]:
    """`(tokens [B] int32, logprobs [B] f32)` chosen from `logits [B, V]` (module docstring).

    Rows are independent: row `i`'s token depends only on `logits[i]` and its own parameters.
    """
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = rows.temperature > 0

    def draw(_):
        z = logits / jnp.where(hot, rows.temperature, 1.0)[:, None]
        limited = jnp.any(hot & ((rows.top_k > 0) | (rows.top_p < 1.0)))
        z = jax.lax.cond(limited, _filtered, lambda z, *_: z, z, rows.top_k, rows.top_p)
        keys = jax.vmap(step_key)(rows.seed, rows.step)
        drawn = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
        return jnp.where(hot, drawn, greedy)

    tokens = jax.lax.cond(jnp.any(hot), draw, lambda _: greedy, None)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
