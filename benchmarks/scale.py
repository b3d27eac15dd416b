"""Workload 5, scale: 1 .. 1000 adapters resident; memory held and switch latency as N grows.

For each N in `scale_counts`, N random adapters (rank `scale_rank` on all 7 projections; they
share one rank and targets, so the bank is already uniform and `conform` is not needed) are
built and measured (spec SW-BENCH-4):
- memory: bytes of live JAX arrays added by the bank (`jax.live_arrays`), then by the stacked
  bank alone (after the per-adapter bank is dropped), vs the raw bytes of the adapters' `a`,
  `b` and `scale`; plus the process RSS growth, for information (allocator effects included);
- switch latency: `jaxlora.select` (one adapter for the batch) and `StackedBank.ids` (slot ids
  for a batch of `batch` rows on different adapters);
- forward time with `select` and with `Routed` (routing `auto`) at N resident adapters;
- PEFT `set_adapter` latency with N adapters loaded (N <= `scale_peft_max`).

Run: `python -m benchmarks --only scale`.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import jax.numpy as jnp

import jaxlora
from jaxlora.models import forward

from ._harness import live_bytes, per_call_seconds, ratio, time_interleaved
from ._setup import PROJECTIONS, Setup

__all__ = ["NAME", "TARGETS", "raw_adapter_bytes", "run"]

NAME = "scale"

TARGETS = {
    "select_latency_maxN_vs_2": ("<=", 1.1),
    "bank_bytes_vs_raw_maxN": ("<=", 1.05),
}


def raw_adapter_bytes(adapter: dict[str, jaxlora.LoraWeights]) -> int:
    """Bytes of an adapter's own arrays (`a`, `b`, `scale` of every layer)."""
    return sum(int(w.a.nbytes + w.b.nbytes + w.scale.nbytes) for w in adapter.values())


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _peft_set_adapter(setup: Setup, n: int, repeats: int):
    """PEFT `set_adapter` latency with `n` adapters loaded (None without PEFT)."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(setup.root / "llama").eval()
    fields = {"r": setup.config.scale_rank, "target_modules": list(PROJECTIONS)}
    model = peft.get_peft_model(base, peft.LoraConfig(**fields), adapter_name="p0")
    for i in range(1, n):
        model.add_adapter(f"p{i}", peft.LoraConfig(**fields))
    names = [f"p{i}" for i in range(n)]
    return per_call_seconds(
        lambda i: model.set_adapter(names[(i * 7919) % n]), calls=20, repeats=repeats
    )


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report (one row per N)."""
    cfg, model = setup.config, setup.model
    tokens = jnp.asarray(setup.tokens(cfg.batch, cfg.seq))
    rows, timings_json = [], {}
    for n in cfg.scale_counts:
        gc.collect()
        before, rss_before = live_bytes(), _rss_bytes()
        bank = jaxlora.AdapterBank(
            {f"n{i}": setup.random_adapter_arrays(cfg.scale_rank, seed=i) for i in range(n)}
        )
        gc.collect()
        bank_bytes, rss_after = live_bytes() - before, _rss_bytes()
        raw = sum(raw_adapter_bytes(bank[name]) for name in bank)
        names = bank.names
        select_t = per_call_seconds(
            lambda i, b=bank, ns=names: jaxlora.select(b, ns[(i * 7919) % len(ns)]),
            calls=1000,
            repeats=cfg.repeats,
        )
        lora = jaxlora.select(bank, names[-1])
        select_fwd = time_interleaved(
            {"select forward": lambda lo=lora: forward(model, tokens, lora=lo)},
            warmup=cfg.warmup,
            repeats=cfg.repeats,
        )["select forward"]
        stacked = jaxlora.stack(bank)
        del bank, lora
        gc.collect()
        stacked_bytes = live_bytes() - before
        batch_names = [names[(i * 7919) % n] for i in range(cfg.batch)]
        ids_t = per_call_seconds(
            lambda i, s=stacked, bn=batch_names: s.ids(bn), calls=100, repeats=cfg.repeats
        )
        routed = stacked.route(batch_names)
        routed_fwd = time_interleaved(
            {"routed forward": lambda r=routed: forward(model, tokens, lora=r)},
            warmup=cfg.warmup,
            repeats=cfg.repeats,
        )["routed forward"]
        fwd = {"select forward": select_fwd, "routed forward": routed_fwd}
        row = {
            "adapters": n,
            "raw_MB": raw / 2**20,
            "bank_vs_raw": ratio(bank_bytes, raw),
            "stacked_vs_raw": ratio(stacked_bytes, raw),
            "rss_growth_vs_raw": None
            if rss_after is None or rss_before is None
            else ratio(rss_after - rss_before, raw),
            "select_us": select_t.median_s * 1e6,
            "ids_us": ids_t.median_s * 1e6,
            "select_fwd_ms": fwd["select forward"].median_s * 1e3,
            "routed_fwd_ms": fwd["routed forward"].median_s * 1e3,
            "peft_set_adapter_us": None,
        }
        if setup.peft and n <= cfg.scale_peft_max:
            peft_t = _peft_set_adapter(setup, n, cfg.repeats)
            row["peft_set_adapter_us"] = peft_t.median_s * 1e6
            timings_json[f"N{n}/peft set_adapter"] = peft_t.as_json()
        rows.append(row)
        timings_json |= {
            f"N{n}/select": select_t.as_json(),
            f"N{n}/ids": ids_t.as_json(),
            **{f"N{n}/{k}": t.as_json() for k, t in fwd.items()},
        }
        del stacked, routed
    return {
        "description": (
            f"N resident adapters of rank {cfg.scale_rank} on all 7 projections, "
            f"N in {list(cfg.scale_counts)}"
        ),
        "results": rows,
        "ratios": _ratios(rows),
        "checks": {},
        "timings": timings_json,
    }


def _ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_n = {r["adapters"]: r for r in rows}
    top = by_n[max(by_n)]
    ref = by_n.get(2, by_n[min(by_n)])
    return {
        "max_adapters": top["adapters"],
        "select_latency_maxN_vs_2": ratio(top["select_us"], ref["select_us"]),
        "ids_latency_maxN_vs_2": ratio(top["ids_us"], ref["ids_us"]),
        "select_forward_maxN_vs_2": ratio(top["select_fwd_ms"], ref["select_fwd_ms"]),
        "routed_forward_maxN_vs_2": ratio(top["routed_fwd_ms"], ref["routed_fwd_ms"]),
        "bank_bytes_vs_raw_maxN": top["bank_vs_raw"],
        "stacked_bytes_vs_raw_maxN": top["stacked_vs_raw"],
    }
