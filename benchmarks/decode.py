"""Workload 4, decode step: one generated token (KV cache) for a batch whose rows all differ.

Each variant gets its own copy of a `KVCache` holding a `batch x seq` prompt (random keys and
values: the step's cost does not depend on them); one timed call is one jitted decode step
(`Llama.run` on one token per row, the cache donated, as in `generate`'s decode loop).
Variants: `base` (no LoRA), `single` (one adapter for every row), and `mixed/<method>` with row
`i` on adapter `i` (`batch` distinct adapters, rank `rank`, all 7 projections).
Check first (spec SW-BENCH-2): row 0 of every mixed step equals row 0 of the single-adapter step
(the same adapter, the same cache).

Run: `python -m benchmarks --only decode`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from jaxlora.models import KVCache

from ._harness import ratio, time_interleaved
from ._setup import Setup, agreement, tol_check

__all__ = ["NAME", "TARGETS", "prompt_cache", "run"]

NAME = "decode"

TARGETS: dict[str, tuple[str, float]] = {}


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"), donate_argnames=("cache",))
def _step(graphdef, state, tokens, cache, lora, routing):
    model = nnx.merge(graphdef, state)
    return model.run(tokens, cache, jnp.ones(tokens.shape, bool), lora, routing)


def prompt_cache(model, batch: int, prompt_len: int, max_len: int, seed: int) -> KVCache:
    """A cache holding `prompt_len` tokens per row (random keys/values), room for the rest.

    The decode step's cost does not depend on what the cache holds (attention runs over every
    slot, masked), so a filled cache stands in for a prefill and saves a compilation per variant.
    """
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    keys = jax.random.split(jax.random.key(seed), 2 * cfg.num_hidden_layers)
    layers = range(cfg.num_hidden_layers)
    return KVCache(
        tuple(jax.random.normal(keys[2 * i], shape, model.dtype) for i in layers),
        tuple(jax.random.normal(keys[2 * i + 1], shape, model.dtype) for i in layers),
        jnp.full((batch,), prompt_len, jnp.int32),
    )


def _chain(model, cache: KVCache, lora, routing: str):
    """A zero-argument callable doing one decode step per call on its own (donated) cache."""
    graphdef, state = nnx.split(model)
    held = {"cache": jax.tree_util.tree_map(jnp.copy, cache)}
    token = jnp.ones((cache.lengths.shape[0], 1), jnp.int32)

    def step() -> Any:
        logits, held["cache"] = _step(graphdef, state, token, held["cache"], lora, routing)
        return logits

    return step


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report."""
    cfg, model = setup.config, setup.model
    bank = jaxlora.AdapterBank(
        {f"d{i}": setup.random_adapter_arrays(cfg.rank, seed=100 + i) for i in range(cfg.batch)}
    )
    stacked = jaxlora.stack(bank)
    routed = jaxlora.Routed(stacked, jnp.arange(cfg.batch, dtype=jnp.int32))
    max_len = cfg.seq + 1 + cfg.warmup + cfg.repeats
    cache = prompt_cache(model, cfg.batch, cfg.seq, max_len, cfg.seed)
    chains = {
        "base": _chain(model, cache, None, "auto"),
        "single": _chain(model, cache, jaxlora.select(bank, "d0"), "auto"),
    }
    for routing in cfg.methods:
        chains[f"mixed/{routing}"] = _chain(model, cache, routed, routing)
    first = {name: fn() for name, fn in chains.items()}
    checks = {
        f"{name}_row0_equals_single": tol_check(agreement(first[name][0], first["single"][0]))
        for name in chains
        if name.startswith("mixed/")
    }
    timings = time_interleaved(chains, warmup=cfg.warmup, repeats=cfg.repeats)
    base_s = timings["base"].median_s
    rows = [
        {
            "variant": name,
            "median_ms": t.median_s * 1e3,
            "min_ms": t.min_s * 1e3,
            "vs_base": ratio(t.median_s, base_s),
            "tokens_per_s": ratio(cfg.batch, t.median_s),
        }
        for name, t in timings.items()
    ]
    mixed = {n: t.median_s for n, t in timings.items() if n.startswith("mixed/")}
    ratios = {
        "single_vs_base": ratio(timings["single"].median_s, base_s),
        "best_mixed_vs_base": ratio(min(mixed.values()), base_s),
    }
    if "mixed/auto" in mixed:
        ratios["mixed_auto_vs_base"] = ratio(mixed["mixed/auto"], base_s)
    return {
        "description": (
            f"one decode step, {cfg.batch} rows each on a different adapter (rank {cfg.rank}), "
            f"prompt {cfg.seq} tokens, cache {max_len} slots"
        ),
        "results": rows,
        "ratios": ratios,
        "checks": checks,
        "timings": {k: t.as_json() for k, t in timings.items()},
    }
