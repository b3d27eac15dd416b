"""Batch generation where every row may use a different adapter (spec SW-GEN-1..6).

A thin wrapper over the engine (`jaxlora.engine`): each prompt becomes one `Request`, all are
submitted to an `Engine` and run to completion on this thread. Rows are independent: a row's
tokens depend on its own prompt, adapter, sampling settings and seed, and on the engine's
configuration, never on the other rows (SW-ENGINE-2). Without `config=`, the configuration is
derived from the batch (`default_config`); pass the same `EngineConfig` to the server, or to
another `generate` call, to get bitwise the same tokens there.

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
import math
import time
from collections.abc import Sequence

import jax
import numpy as np

from .engine import Engine, EngineConfig, Request, SamplingParams
from .engine import compile_counts as _engine_compile_counts
from .errors import ConfigError
from .models.llama import Llama, check_lora
from .sharding import to_host
from .types import NO_ADAPTER, LoraSelection, Routed, Routing

__all__ = ["Generation", "compile_counts", "default_config", "generate"]

Array = jax.Array

#: The most decode steps `default_config` runs per device call (measured: 32 rows x 32 new
#: tokens, 1.08 s -> 0.80 s from 1 to 32 steps per call; BENCHMARKS.md, Engine).
DECODE_STEPS = 32


@dataclasses.dataclass(frozen=True)
class Generation:
    """The result of `generate`.

    Arguments:
        tokens: `[batch, max_new_tokens]` generated ids; `pad_id` after a row's stop token.
        lengths: `[batch]` generated tokens per row, the stop token included.
        prompt_len: the longest prompt's length.
        seconds: wall time of the generation (after compilation if it was cached).
        logprobs: `[batch, max_new_tokens]` log-probabilities of the tokens (0 after a stop).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    prompt_len: int
    seconds: float
    logprobs: np.ndarray | None = None

    def rows(self) -> list[list[int]]:
        """Each row's generated tokens, without the padding after a stop."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


def compile_counts() -> dict[str, int]:
    """How many executables the prefill and decode step hold (one per distinct shape set).

    Example:
        >>> sorted(compile_counts())
        ['decode', 'prefill']
    """
    return _engine_compile_counts()


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, *, routing: Routing = "auto"
) -> EngineConfig:
    """The `EngineConfig` `generate` uses without `config=`: every prompt in one pool.

    `rows` = the number of prompts rounded up to a power of two (at most 64), `max_len` = the
    longest prompt + `max_new_tokens` rounded up to a multiple of 32, one prefill chunk size
    (the longest prompt rounded up to a power of two, at most 256) and room for every row's
    chunk in one prefill call: batches of the same shape share one compilation (SW-GEN-5).
    Decoding runs up to `DECODE_STEPS` steps per device call (SW-ENGINE-1): a batch call has no
    request arriving meanwhile, so fewer host round trips cost no admission latency.

    Example:
        >>> default_config([[1, 2, 3], [4]], 5).compiled_shapes()
        {'decode': (2, 1), 'prefill/4': (2, 4)}
    """
    longest = max(len(p) for p in prompts)
    rows = min(_pow2(len(prompts)), 64)
    max_len = -(-(longest + max_new_tokens) // 32) * 32
    chunk = min(_pow2(longest), 256, max_len)
    return EngineConfig(
        rows=rows,
        max_len=max_len,
        chunks=(chunk,),
        prefill_tokens=chunk * min(rows, max(1, 1024 // chunk)),
        routing=routing,
        decode_steps=DECODE_STEPS,  # not capped by max_new_tokens: one executable for all
    )


def _stop_lists(stop_tokens, batch: int) -> list[tuple[int, ...]]:
    stop_tokens = list(stop_tokens)
    per_row = bool(stop_tokens) and not isinstance(stop_tokens[0], int | np.integer)
    rows = [tuple(int(t) for t in s) for s in stop_tokens] if per_row else None
    if rows is None:
        return [tuple(int(t) for t in stop_tokens)] * batch
    if len(rows) != batch:
        raise ConfigError(
            f"`stop_tokens` has {len(rows)} per-row lists but there are {batch} prompts; give "
            "one list per prompt or one flat list for every row."
        )
    return rows


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[tuple[int, ...]]:
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
    return [tuple(int(t) for t in row) for row in rows]


def _seeds(seed, key, batch: int) -> list[int]:
    if seed is not None:
        seeds = [seed] * batch if isinstance(seed, int | np.integer) else list(seed)
        if len(seeds) != batch:
            raise ConfigError(f"`seed` has {len(seeds)} entries for {batch} prompts.")
        return [int(s) for s in seeds]
    if key is None:
        return [0] * batch
    # one uint32 seed per row from the key: the same key gives the same tokens (SW-GEN-4)
    bits = jax.random.bits(key, (batch,), np.uint32)
    return [int(b) for b in to_host(bits)]


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    lora: LoraSelection = None,
    routing: Routing = "auto",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    key: Array | None = None,
    seed: int | Sequence[int] | None = None,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    config: EngineConfig | None = None,
) -> Generation:
    """Generate up to `max_new_tokens` per prompt, each row under its own adapter.

    Arguments:
        model: the decoder.
        prompts: token-id lists, any lengths.
        lora: `stacked.route(names)` (one adapter name or None per prompt, a mixed batch,
            SW-GEN-1; `stacked = jaxlora.stack(jaxlora.conform(bank))`, made once),
            `jaxlora.select(bank, name)` / one adapter for every row, or None (the base model).
        routing: the mixed-batch kernel (see `jaxlora.routing`), when `config` is not given.
        max_new_tokens: tokens to generate per row (fewer if the row stops).
        temperature: 0 for greedy; otherwise sample (`jaxlora.engine.sampling`).
        top_k, top_p: sample only among the `top_k` largest logits / the top-`top_p` mass.
        key: `jax.random.key`; row `i` samples with seed `jax.random.bits(key, (batch,))[i]`.
        seed: instead of `key`, one seed for every row or one per row (the server's `seed`).
        stop_tokens: token ids that end a row (kept in its output), one flat list for all rows
            or one list per row.
        pad_id: the id written after a stopped row's last token.
        config: the engine's sizes (default `default_config(prompts, max_new_tokens)`).

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
    if temp > 0 and key is None and seed is None:
        raise ConfigError(
            f"sampling with temperature={temperature} needs an explicit `key=jax.random.key(s)` "
            "or `seed=`; use temperature=0.0 for greedy decoding."
        )
    vocab = model.config.vocab_size
    if top_k is not None and not (0 < int(top_k) <= vocab):
        raise ConfigError(f"`top_k` must be in [1, {vocab}], got {top_k!r}.")
    rows = _check_prompts(prompts, vocab)
    batch = len(rows)
    sel = check_lora(model, lora, batch)
    stops = _stop_lists(stop_tokens, batch)
    if config is None:
        config = default_config(rows, max_new_tokens, routing=routing)
        if sel is None:
            config = dataclasses.replace(config, slots=0)  # the base model: no LoRA at all
    widest = max(len(s) for s in stops)
    if widest > config.stop_width:
        config = dataclasses.replace(config, stop_width=widest)
    if isinstance(sel, Routed):
        ids = to_host(sel.ids)  # also when the ids span processes (SW-TP-4)
        bad = ids[(ids < NO_ADAPTER) | (ids >= len(sel.stacked.names))]
        if bad.size:
            raise ConfigError(
                f"slot ids must be in [-1, {len(sel.stacked.names)}) (-1: no adapter); got "
                f"{sorted(set(bad.tolist()))[:10]}. Build ids with StackedBank.ids(names)."
            )
        engine = Engine(model, config, bank=sel.stacked)
        names = [None if i == NO_ADAPTER else sel.stacked.names[i] for i in ids.tolist()]
    elif sel is not None:
        engine = Engine(model, config, lora=sel)
        names = [None] * batch
    else:
        engine = Engine(model, config)
        names = [None] * batch
    seeds = _seeds(seed, key, batch)
    requests = [
        Request(
            row,
            max_new_tokens,
            adapter=name,
            sampling=SamplingParams(temp, int(top_k or 0), float(top_p), s),
            stop_tokens=stop,
        )
        for row, name, s, stop in zip(rows, names, seeds, stops, strict=True)
    ]
    start = time.perf_counter()
    results = engine.generate(requests)
    seconds = time.perf_counter() - start
    tokens = np.full((batch, max_new_tokens), pad_id, np.int32)
    logprobs = np.zeros((batch, max_new_tokens), np.float32)
    for i, r in enumerate(results):
        tokens[i, : len(r.tokens)] = r.tokens
        logprobs[i, : len(r.tokens)] = r.logprobs
    lengths = np.asarray([len(r.tokens) for r in results], np.int32)
    return Generation(tokens, lengths, max(len(r) for r in rows), seconds, logprobs)
