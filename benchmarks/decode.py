"""Workload 4, decode step: the engine's decode step against its roofline, the cache and adapters.

One timed call is one call of the engine's decode step (`jaxlora.engine.steps`: one token
for each of `batch` rows, the KV cache donated and updated in place, the next token sampled),
chained on its own cache. Variants, all timed interleaved in one run:

- `step/L` and `roofline/L` for cache lengths `L`: the base decode step, and a microbenchmark of
  the same projection matmuls (7 per layer and the LM head, on `[batch, hidden]`) plus one read
  of every key and value of the cache (a dot against each), nothing else: the floor the step
  is compared with (target: step <= 1.5x roofline at 256 slots). The slope of time vs `L`,
  against the KV bytes per slot, gives the bandwidth each achieves.
- `mixed<d>/<method>`: the step with rows on `d` distinct adapters (a bank of `d` slots), per
  routing kernel; its extra time over `step` is compared with reading the `d` adapters' bytes
  at the roofline's bandwidth.
- `step/<L>/x8`, `mixed<d>/auto/x8`: the same steps, 8 per device call (as `generate()` runs
  them): per-step time = call time / 8. Inside one call the kernels' per-call work on the bank
  (the `onehot` finiteness guard and its copy, SW-NUM-3) is hoisted out of the step loop.
- `step-bf16`: the step with a bfloat16 cache; `layout/heads-major`, `layout/slot-major`: cache
  update + attention of all layers alone, in the engine's layout and in `[rows, L, heads, d]`.

Check first (SW-BENCH-2): row 0 of the mixed step's logits equals row 0 of the
single-adapter step (same adapter, same cache), for every method.

Run: `python -m benchmarks --only decode`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxlora
from jaxlora.engine import steps
from jaxlora.models import KVCache
from jaxlora.models.attention import cache_bytes
from jaxlora.types import Routed

from ._harness import ratio, time_interleaved
from ._setup import Setup, agreement, tol_check

__all__ = ["NAME", "TARGETS", "prompt_cache", "run"]

NAME = "decode"

TARGETS: dict[str, tuple[str, float]] = {"step_vs_roofline_256": ("<=", 1.5)}

#: decode steps per call of the `.../x8` variants (what `generate()` runs per call, up to 32)
PER_CALL = 8


def prompt_cache(
    model, batch: int, prompt_len: int, max_len: int, seed: int, dtype=None
) -> KVCache:
    """A cache holding `prompt_len` random tokens per row, room up to `max_len` slots."""
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    rng = np.random.default_rng(seed)  # NumPy: no compilation per cache shape
    dtype = model.dtype if dtype is None else dtype
    arrays = [
        jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
        for _ in range(2 * cfg.num_hidden_layers)
    ]
    n = cfg.num_hidden_layers
    return KVCache(tuple(arrays[:n]), tuple(arrays[n:]), jnp.full((batch,), prompt_len, jnp.int32))


def _inputs(batch: int, position: int, distinct: int) -> tuple[np.ndarray, np.ndarray]:
    ints = np.full((batch, steps.DECODE_COLUMNS + 1), -1, np.int32)  # one stop token: none
    ints[:, 0], ints[:, 1], ints[:, 3:7] = 1, position, (0, 0, 0, 2**20)
    ints[:, 2] = -1 if distinct == 0 else np.arange(batch) % distinct
    return ints, np.zeros((batch, 2), np.float32)


def _step_chain(model, cache: KVCache, bank, distinct: int, routing: str, per_call: int = 1):
    """One timed call = `per_call` decode steps in one device call (1: the step itself, as the
    server runs it; more: as `generate()` runs them, the per-call work on the bank amortised)."""
    graphdef, state = nnx.split(model)
    decode = steps.for_model(graphdef).decode
    held = {"cache": jax.tree_util.tree_map(jnp.copy, cache)}
    ints, floats = _inputs(cache.k[0].shape[0], int(cache.lengths[0]), distinct)
    ints, floats = jnp.asarray(ints), jnp.asarray(floats)
    control = jnp.asarray([per_call, 0], jnp.int32)

    def step() -> Any:
        *out, held["cache"] = decode(
            state,
            held["cache"],
            bank,
            None,
            ints,
            floats,
            control,
            routing=routing,
            block=per_call,
        )
        return out

    return step


def _projection_kernels(model) -> list[list[jax.Array]]:
    layers = []
    for layer in model.layers:
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        layers.append([getattr(layer, n).kernel[...] for n in names])
    return layers


@jax.jit
def _roofline(kernels, head, x, ks, vs):
    """The step's matmuls plus one dot against every cached key and value (no softmax, norms,
    RoPE or sampling): what a decode step cannot go below."""
    b, kvh, _, d = ks[0].shape
    for (wq, wk, wv, wo, wg, wu, wd), k, v in zip(kernels, ks, vs, strict=True):
        q = (x @ wq).reshape(b, kvh, -1, d)
        kv = (x @ wk) + (x @ wv)
        scores = jnp.einsum("bkgd,bkld->bkgl", q, k)
        read = jnp.einsum("bkgl,bkld->bkgd", scores, v).reshape(b, -1)
        x = x + (read @ wo) + kv.sum() * 0
        x = x + ((x @ wg) * (x @ wu)) @ wd
    return x @ head


def _roofline_chain(model, cache: KVCache):
    kernels = _projection_kernels(model)
    head = model.embed[...].T if model.lm_head is None else model.lm_head[...]
    x = jnp.ones((cache.k[0].shape[0], model.config.hidden_size), model.dtype) * 0.01
    return lambda: _roofline(kernels, head, x, cache.k, cache.v)


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _layout_heads_major(ks, vs, q, pos):
    out, nk, nv = q, [], []
    rows = jnp.arange(q.shape[0])
    for k, v in zip(ks, vs, strict=True):  # k [B, H, L, D]
        k = k.at[rows, :, pos].set(out)
        v = v.at[rows, :, pos].set(out)
        s = jax.nn.softmax(jnp.einsum("bhd,bhld->bhl", out, k), axis=-1)
        out = out + jnp.einsum("bhl,bhld->bhd", s, v) * 1e-3
        nk.append(k)
        nv.append(v)
    return out, nk, nv


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _layout_slot_major(ks, vs, q, pos):
    out, nk, nv = q, [], []
    rows = jnp.arange(q.shape[0])
    for k, v in zip(ks, vs, strict=True):  # k [B, L, H, D]
        k = k.at[rows, pos].set(out)
        v = v.at[rows, pos].set(out)
        s = jax.nn.softmax(jnp.einsum("bhd,blhd->bhl", out, k), axis=-1)
        out = out + jnp.einsum("bhl,blhd->bhd", s, v) * 1e-3
        nk.append(k)
        nv.append(v)
    return out, nk, nv


def _layout_chain(fn, cache: KVCache, slot_major: bool):
    swap = (lambda a: jnp.swapaxes(a, 1, 2)) if slot_major else jnp.copy
    held = {"k": [swap(a) for a in cache.k], "v": [swap(a) for a in cache.v]}
    b, h, _, d = cache.k[0].shape
    q, pos = jnp.ones((b, h, d), cache.k[0].dtype), jnp.full((b,), int(cache.lengths[0]))

    def step():
        out, held["k"], held["v"] = fn(held["k"], held["v"], q, pos)
        return out

    return step


@functools.partial(jax.jit, static_argnames=("graphdef", "method"))
def _logits(graphdef, state, tokens, cache, lora, method):
    model = nnx.merge(graphdef, state)
    positions = cache.lengths[:, None]
    return model.run(tokens, cache, None, lora, method, positions=positions)[0][:, 0]


def _slope(lengths: list[int], seconds: list[float]) -> float:
    """Least-squares seconds per cache slot."""
    return float(np.polyfit(np.asarray(lengths, float), np.asarray(seconds, float), 1)[0])


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report."""
    cfg, model = setup.config, setup.model
    lengths = [cfg.seq * m for m in (1, 2, 4, 8)]
    target_len = 256 if 256 in lengths else lengths[-1]
    counts = sorted({c for c in (1, 8, 32) if c <= cfg.batch} | {cfg.batch})
    adapters = [setup.random_adapter_arrays(cfg.rank, seed=100 + i) for i in range(max(counts))]
    caches = {n: prompt_cache(model, cfg.batch, cfg.seq, n, cfg.seed) for n in lengths}
    chains: dict[str, Any] = {}
    for n in lengths:
        chains[f"step/{n}"] = _step_chain(model, caches[n], None, 0, "auto")
        chains[f"roofline/{n}"] = _roofline_chain(model, caches[n])
    cache = caches[target_len]
    banks = {}
    for d in counts:
        banks[d] = jaxlora.stack(jaxlora.AdapterBank({f"d{i}": adapters[i] for i in range(d)}))
        for method in cfg.methods:
            chains[f"mixed{d}/{method}"] = _step_chain(model, cache, banks[d], d, method)
    # The same steps inside one call of PER_CALL steps (what `generate()` runs): per-step times.
    chains[f"step/{target_len}/x{PER_CALL}"] = _step_chain(model, cache, None, 0, "auto", PER_CALL)
    for d in counts:
        chains[f"mixed{d}/auto/x{PER_CALL}"] = _step_chain(
            model, cache, banks[d], d, "auto", PER_CALL
        )
    half = prompt_cache(model, cfg.batch, cfg.seq, target_len, cfg.seed, jnp.bfloat16)
    chains["step-bf16"] = _step_chain(model, half, None, 0, "auto")
    chains["layout/heads-major"] = _layout_chain(_layout_heads_major, cache, False)
    chains["layout/slot-major"] = _layout_chain(_layout_slot_major, cache, True)

    graphdef, state = nnx.split(model)
    tokens = jnp.ones((cfg.batch, 1), jnp.int32)
    top = max(counts)
    single = _logits(
        graphdef,
        state,
        tokens,
        cache,
        jaxlora.select(jaxlora.AdapterBank({"d0": adapters[0]}), "d0"),
        "auto",
    )
    checks = {}
    for method in cfg.methods:
        ids = jnp.asarray(np.arange(cfg.batch) % top, jnp.int32)
        mixed = _logits(graphdef, state, tokens, cache, Routed(banks[top], ids), method)
        checks[f"mixed/{method}_row0_equals_single"] = tol_check(agreement(mixed[0], single[0]))

    timings = time_interleaved(chains, warmup=cfg.warmup, repeats=cfg.repeats)
    med = {name: t.median_s for name, t in timings.items()}
    c = model.config
    kv_per_slot = cache_bytes(
        c.num_hidden_layers, cfg.batch, 1, c.num_key_value_heads, c.head_dim, model.dtype
    )
    step_slope = _slope(lengths, [med[f"step/{n}"] for n in lengths])
    roof_slope = _slope(lengths, [med[f"roofline/{n}"] for n in lengths])
    bandwidth = ratio(kv_per_slot, roof_slope)  # bytes/s the roofline reads the cache at
    adapter_bytes = sum(w.a.nbytes + w.b.nbytes + w.scale.nbytes for w in adapters[0].values())
    rows: list[dict[str, Any]] = []
    multi = f"/x{PER_CALL}"
    base_s = med[f"step/{target_len}"]
    base_multi_s = med[f"step/{target_len}{multi}"] / PER_CALL
    for name, t in timings.items():
        row = {"variant": name, "median_ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3}
        per_step, base = t.median_s, base_s
        if name.endswith(multi):
            per_step, base = t.median_s / PER_CALL, base_multi_s
            row["per_step_ms"] = per_step * 1e3
        if name.startswith("mixed"):
            d = int(name[5:].split("/")[0])
            row["vs_base"] = ratio(per_step, base)
            row["extra_ms"] = (per_step - base) * 1e3
            row["adapter_bound_ms"] = ratio(d * adapter_bytes, bandwidth) * 1e3
        rows.append(row)
    ratios: dict[str, Any] = {
        "step_vs_roofline_256": ratio(med[f"step/{target_len}"], med[f"roofline/{target_len}"]),
        "step_ms_per_1k_slots": step_slope * 1e6,
        "roofline_ms_per_1k_slots": roof_slope * 1e6,
        "kv_mb_per_1k_slots": kv_per_slot * 1e3 / 1e6,
        "step_gb_per_s": ratio(kv_per_slot, step_slope) / 1e9,
        "roofline_gb_per_s": bandwidth / 1e9,
        "bf16_vs_f32_step": ratio(med["step-bf16"], base_s),
        "slot_major_vs_heads_major": ratio(med["layout/slot-major"], med["layout/heads-major"]),
    }
    for d in counts:
        for method in cfg.methods:
            extra = med[f"mixed{d}/{method}"] - base_s
            ratios[f"mixed{d}_{method}_extra_vs_bound"] = ratio(
                extra, ratio(d * adapter_bytes, bandwidth)
            )
    for d in counts:
        extra = med[f"mixed{d}/auto{multi}"] / PER_CALL - base_multi_s
        ratios[f"mixed{d}_auto_x{PER_CALL}_extra_vs_bound"] = ratio(
            extra, ratio(d * adapter_bytes, bandwidth)
        )
    return {
        "description": (
            f"one engine decode step, {cfg.batch} rows, cache lengths {lengths} (ratios at "
            f"{target_len}), rank-{cfg.rank} adapters on all 7 projections for the mixed steps "
            f"({adapter_bytes / 1e6:.2f} MB each)"
        ),
        "results": rows,
        "ratios": ratios,
        "checks": checks,
        "timings": {k: t.as_json() for k, t in timings.items()},
    }
