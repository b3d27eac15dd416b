"""Workload 3, mixed batch: rows on 1..32 distinct adapters, each routing method vs alternatives.

A stacked bank of `max(mixed_counts)` adapters (rank `rank`, all 7 projections) is resident;
with `k` distinct adapters, row `i` uses adapter `i mod k` (equal groups). Timed, interleaved:
- `base`: the forward without LoRA; `single`: one adapter for every row (`select`);
- `routed/<method>`: `Routed(stacked, ids)` with each routing method;
- `grouped loop`: one `select` forward per adapter group on its rows, outputs put back in row
  order (the "batch task grouping" pattern);
- `peft mixed`: PEFT's `adapter_names=` forward, and `peft base` (`disable_adapter()`).
Checks first (spec SW-BENCH-2): every routing method equals the grouped loop, and PEFT's logits
equal jaxlora's. Compilations are counted per method over all `k` (one stacked bank, one batch
shape: expected 1 each, SW-BENCH-3).

Run: `python -m benchmarks --only mixed`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora.models import forward

from ._harness import count_compiles, ratio, time_interleaved
from ._setup import Setup, agreement, tol_check, torch_forward

__all__ = ["NAME", "TARGETS", "run"]

NAME = "mixed"

TARGETS = {
    "mixed8_vs_base": ("<=", 1.20),
    "mixed8_vs_grouped": ("<", 1.0),
    "peft_vs_jaxlora_mixed8_time": (">=", 2.0),
}


def _grouped_loop(model, tokens, bank, row_names: list[str]):
    """A zero-argument callable: one forward per adapter group, results back in row order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(row_names):
        groups.setdefault(name, []).append(i)
    parts = [(jaxlora.select(bank, n), tokens[np.asarray(rows)]) for n, rows in groups.items()]
    inverse = jnp.asarray(np.argsort(np.concatenate([rows for rows in groups.values()])))

    def run() -> Any:
        outs = [forward(model, sub, lora=lora) for lora, sub in parts]
        return jnp.concatenate(outs)[inverse]

    return run


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report (one row per distinct-adapter count and variant)."""
    cfg, model = setup.config, setup.model
    counts = [k for k in cfg.mixed_counts if k <= cfg.batch]
    names = [f"m{i}" for i in range(max(counts))]
    bank, peft_model = setup.adapters("mixed", dict.fromkeys(names, cfg.rank))
    conformed = jaxlora.conform(bank)
    stacked = jaxlora.stack(conformed)
    tokens_np = setup.tokens(cfg.batch, cfg.seq)
    tokens = jnp.asarray(tokens_np)
    single = jaxlora.select(conformed, names[0])

    rows, checks, timings_json = [], {}, {}
    compiles = dict.fromkeys(cfg.methods, 0)
    for k in counts:
        row_names = [names[i % k] for i in range(cfg.batch)]
        routed = stacked.route(row_names)
        grouped = _grouped_loop(model, tokens, conformed, row_names)
        reference = grouped()
        variants: dict[str, Any] = {
            "base": lambda: forward(model, tokens),
            "single": lambda: forward(model, tokens, lora=single),
        }
        for routing in cfg.methods:
            with count_compiles() as n:
                out = forward(model, tokens, lora=routed, routing=routing)
                out.block_until_ready()
            compiles[routing] += n[0]
            checks[f"k{k}_{routing}_equals_grouped"] = tol_check(agreement(out, reference))
            variants[f"routed/{routing}"] = lambda m=routing, r=routed: forward(
                model, tokens, lora=r, routing=m
            )
        variants["grouped loop"] = grouped
        if peft_model is not None:
            theirs = torch_forward(peft_model, tokens_np, adapter_names=row_names)
            checks[f"k{k}_equals_peft"] = tol_check(agreement(reference, theirs))
            variants["peft mixed"] = lambda rn=row_names: torch_forward(
                peft_model, tokens_np, adapter_names=rn
            )

            def peft_base():
                with peft_model.disable_adapter():
                    return torch_forward(peft_model, tokens_np)

            variants["peft base"] = peft_base
        timings = time_interleaved(variants, warmup=cfg.warmup, repeats=cfg.repeats)
        base_s, single_s = timings["base"].median_s, timings["single"].median_s
        for variant, t in timings.items():
            rows.append(
                {
                    "distinct": k,
                    "variant": variant,
                    "median_ms": t.median_s * 1e3,
                    "min_ms": t.min_s * 1e3,
                    "vs_base": ratio(t.median_s, base_s),
                    "vs_single": ratio(t.median_s, single_s),
                }
            )
            timings_json[f"k{k}/{variant}"] = t.as_json()

    ratios = _ratios(rows, peft_model is not None)
    ratios |= {f"compiles_{m}": c for m, c in compiles.items()}
    return {
        "description": (
            f"batch {cfg.batch} x {cfg.seq} tokens, {len(names)} resident adapters of rank "
            f"{cfg.rank} on all 7 projections, distinct adapters in the batch: {counts}"
        ),
        "results": rows,
        "ratios": ratios,
        "checks": checks,
        "timings": timings_json,
    }


def _ratios(rows: list[dict[str, Any]], with_peft: bool) -> dict[str, float]:
    """The headline ratios, at 8 distinct adapters (or the largest count below 8)."""
    counts = sorted({r["distinct"] for r in rows})
    k = max([c for c in counts if c <= 8] or counts)
    at = {r["variant"]: r["median_ms"] for r in rows if r["distinct"] == k}
    out = {
        "distinct_for_headline": k,
        "mixed8_vs_base": ratio(at["routed/auto"], at["base"]) if "routed/auto" in at else None,
        "mixed8_vs_grouped": ratio(at.get("routed/auto", 0.0), at["grouped loop"]),
    }
    best = min(v for name, v in at.items() if name.startswith("routed/"))
    out["best_method_vs_base"] = ratio(best, at["base"])
    if with_peft:
        out["peft_vs_jaxlora_mixed8_time"] = ratio(at["peft mixed"], at.get("routed/auto", best))
        out["peft_mixed_vs_peft_base"] = ratio(at["peft mixed"], at["peft base"])
    return out
