"""Batch generation where every row may use a different adapter (spec SW-GEN-1..6).

Prompts are left padded to one length, prefilled in one call, then decoded one token per step
by a jit-compiled step whose shapes never change (the KV cache is preallocated to
`prompt_len + max_new_tokens`), so it compiles once per batch shape and bank shape; which
adapter each row uses is data (slot ids), never a retrace.

Example:
    >>> import jax, jaxlora
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    >>> bank = jaxlora.AdapterBank().add(
    ...     "a", jaxlora.init_adapter(jax.random.key(0), cfg, model.lora_shapes()))
    >>> lora = jaxlora.stack(jaxlora.conform(bank)).route(["a", None])
    >>> out = generate(model, [[1, 2, 3], [4]], lora=lora, max_new_tokens=4)
    >>> [len(row) for row in out.rows()]
    [4, 4]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import ConfigError
from .models.llama import Llama, check_lora, init_cache
from .types import LoraSelection, Routing

__all__ = ["Generation", "compile_counts", "generate"]

Array = jax.Array

#: How many decode steps run between checks that every row has stopped (a host sync).
_STOP_CHECK_EVERY = 8


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `generate`.

    Arguments:
        tokens: `[batch, max_new_tokens]` generated ids; `pad_id` after a row's stop token.
        lengths: `[batch]` generated tokens per row, the stop token included.
        prompt_len: the padded prompt length.
        seconds: wall time of prefill + decode (after compilation if it was cached).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_len: int
    seconds: float

    def rows(self) -> list[list[int]]:
        """Each row's generated tokens, without the padding after a stop."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def _pick(logits, key, step, temperature, greedy: bool, top_k: int | None):
    """Next token per row: argmax, or a sample from softmax(logits / T) over the top k."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    keys = jax.random.split(jax.random.fold_in(key, step), logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, logits / temperature).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"), donate_argnames=("cache",))
def _prefill(graphdef, state, tokens, mask, cache, lora, routing):
    model = nnx.merge(graphdef, state)
    logits, cache = model.run(tokens, cache, mask, lora, routing)
    return logits[:, -1], cache


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "routing", "greedy", "top_k"),
    donate_argnames=("cache",),
)
def _decode_step(
    graphdef, state, logits, cache, done, stop, step, sampling, lora, routing, greedy, top_k
):
    key, temperature, pad_id = sampling
    token = _pick(logits, key, step, temperature, greedy, top_k)
    token = jnp.where(done, pad_id, token)
    done = done | jnp.any(token[:, None] == stop, axis=-1)
    model = nnx.merge(graphdef, state)
    ones = jnp.ones((token.shape[0], 1), bool)
    logits, cache = model.run(token[:, None], cache, ones, lora, routing)
    return token, done, logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("greedy", "top_k"))
def _last_token(logits, done, step, sampling, greedy, top_k):
    key, temperature, pad_id = sampling
    token = _pick(logits, key, step, temperature, greedy, top_k)
    return jnp.where(done, pad_id, token)


def compile_counts() -> dict[str, int]:
    """How many executables the prefill and decode step hold (one per distinct shape set).

    Example:
        >>> sorted(compile_counts())
        ['decode', 'prefill']
    """
    return {"prefill": _prefill._cache_size(), "decode": _decode_step._cache_size()}


def _stop_array(stop_tokens, batch: int) -> np.ndarray:
    stop_tokens = list(stop_tokens)
    per_row = bool(stop_tokens) and not isinstance(stop_tokens[0], int | np.integer)
    rows = [list(s) for s in stop_tokens] if per_row else [stop_tokens] * batch
    if len(rows) != batch:
        raise ConfigError(
            f"`stop_tokens` has {len(rows)} per-row lists but there are {batch} prompts; give "
            "one list per prompt or one flat list for every row."
        )
    width = max(1, *(len(r) for r in rows))
    out = np.full((batch, width), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, vocab: int):
    if not prompts:
        raise ConfigError("`prompts` is empty; pass a list of token-id lists.")
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ConfigError(f"prompt {i} is empty; every row needs at least one token.")
        if row.min() < 0 or row.max() >= vocab:
            raise ConfigError(
                f"prompt {i} has token id {int(row.max() if row.max() >= vocab else row.min())} "
                f"outside the vocabulary [0, {vocab})."
            )
    width = max(r.size for r in rows)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - row.size :] = row
        mask[i, width - row.size :] = True
    return tokens, mask


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    lora: LoraSelection = None,
    routing: Routing = "auto",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: Array | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
) -> Generation:
    """Generate up to `max_new_tokens` per prompt, each row under its own adapter.

    Arguments:
        model: the decoder.
        prompts: token-id lists, any lengths (left padded with `pad_id`).
        lora: `stacked.route(names)` (one adapter name or None per prompt, a mixed batch,
            SW-GEN-1; `stacked = jaxlora.stack(jaxlora.conform(bank))`, made once),
            `jaxlora.select(bank, name)` / one adapter for every row, or None (the base model).
        routing: the mixed-batch kernel (see `jaxlora.routing`).
        max_new_tokens: tokens to generate per row (fewer if the row stops).
        temperature: 0 for greedy; otherwise sample from `softmax(logits / temperature)`.
        top_k: sample only among the `top_k` largest logits.
        key: `jax.random.key`, required when sampling; row `i` at step `t` uses
            `split(fold_in(key, t), batch)[i]`.
        stop_tokens: token ids that end a row (kept in its output), one flat list for all rows
            or one list per row.
        pad_id: the padding id, left of prompts and after a stopped row's last token.

    Returns:
        A `Generation`; `.rows()` lists each row's tokens.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    try:
        temp = float(temperature)
    except (TypeError, ValueError):
        temp = math.nan
    if not math.isfinite(temp) or temp < 0:
        raise ConfigError(
            f"`temperature` must be a finite number >= 0, got {temperature!r}; use 0.0 for "
            "greedy decoding or a positive value (with `key=`) for sampling."
        )
    greedy = temp == 0.0
    if not greedy and key is None:
        raise ConfigError(
            f"sampling with temperature={temperature} needs temperature > 0 and an explicit "
            "`key=jax.random.key(seed)`; use temperature=0.0 for greedy decoding."
        )
    if top_k is not None and not (0 < int(top_k) <= model.config.vocab_size):
        raise ConfigError(f"`top_k` must be in [1, {model.config.vocab_size}], got {top_k!r}.")
    tokens, mask = _left_pad(prompts, pad_id, model.config.vocab_size)
    batch, prompt_len = tokens.shape
    lora = check_lora(model, lora, batch)
    stop = jnp.asarray(_stop_array(stop_tokens, batch))
    sampling = (
        jax.random.key(0) if key is None else key,
        jnp.asarray(max(temp, 1e-6), jnp.float32),
        jnp.asarray(pad_id, jnp.int32),
    )
    graphdef, state = nnx.split(model)
    static = {"greedy": greedy, "top_k": None if top_k is None else int(top_k)}
    start = time.perf_counter()
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, model.dtype)
    logits, cache = _prefill(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), cache, lora, routing
    )
    done = jnp.zeros((batch,), bool)
    out = []
    for step in range(max_new_tokens - 1):
        token, done, logits, cache = _decode_step(
            graphdef, state, logits, cache, done, stop, step, sampling, lora, routing, **static
        )
        out.append(token)
        if (step + 1) % _STOP_CHECK_EVERY == 0 and bool(jnp.all(done)):
            break
    if len(out) == max_new_tokens - 1:
        out.append(_last_token(logits, done, max_new_tokens - 1, sampling, **static))
    generated = np.asarray(jnp.stack(out, axis=1))
    seconds = time.perf_counter() - start
    generated = np.pad(
        generated, ((0, 0), (0, max_new_tokens - generated.shape[1])), constant_values=pad_id
    )
    return Generation(generated, _lengths(generated, np.asarray(stop)), prompt_len, seconds)


def _lengths(generated: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """Tokens up to and including each row's first stop token (all if none)."""
    hits = (generated[:, :, None] == stop[:, None, :]).any(-1) & (stop >= 0).any(-1)[:, None]
    first = np.where(hits.any(1), hits.argmax(1) + 1, generated.shape[1])
    return first.astype(np.int32)
