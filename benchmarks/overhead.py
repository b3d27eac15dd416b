"""Workload 2, single-adapter overhead: unmerged LoRA forward vs base and vs merged weights.

The merged-weights forward is the physical limit (zero LoRA cost at run time). The same three
forwards are timed for PEFT on PyTorch: base (`disable_adapter()`), unmerged (`set_adapter`) and
merged (`merge_adapter()`, timed after the others since it changes the model in place).
Checks first (spec SW-BENCH-2): merged logits equal unmerged ones, and PEFT's equal jaxlora's.

Run: `python -m benchmarks --only overhead`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

import jaxlora
from jaxlora.models import forward

from ._harness import ratio, time_interleaved
from ._setup import Setup, agreement, merged_model, tol_check, torch_forward

__all__ = ["NAME", "TARGETS", "run"]

NAME = "overhead"

TARGETS = {"unmerged_vs_base": ("<=", 1.10)}


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report."""
    cfg, model = setup.config, setup.model
    bank, peft_model = setup.adapters("overhead", {"o0": cfg.rank})
    lora = jaxlora.select(bank, "o0")
    merged = merged_model(model, bank["o0"])
    tokens_np = setup.tokens(cfg.batch, cfg.seq)
    tokens = jnp.asarray(tokens_np)

    ours = forward(model, tokens, lora=lora)
    checks = {"merged_equals_unmerged": tol_check(agreement(forward(merged, tokens), ours))}
    variants = {
        ("jaxlora", "base"): lambda: forward(model, tokens),
        ("jaxlora", "unmerged"): lambda: forward(model, tokens, lora=lora),
        ("jaxlora", "merged"): lambda: forward(merged, tokens),
    }
    if peft_model is not None:
        peft_model.set_adapter("o0")
        checks["equals_peft"] = tol_check(agreement(ours, torch_forward(peft_model, tokens_np)))

        def peft_base():
            with peft_model.disable_adapter():
                return torch_forward(peft_model, tokens_np)

        variants[("peft", "base")] = peft_base
        variants[("peft", "unmerged")] = lambda: torch_forward(peft_model, tokens_np)
    timings = time_interleaved(variants, warmup=cfg.warmup, repeats=cfg.repeats)
    if peft_model is not None:
        peft_model.merge_adapter()
        try:
            timings |= time_interleaved(
                {("peft", "merged"): lambda: torch_forward(peft_model, tokens_np)},
                warmup=cfg.warmup,
                repeats=cfg.repeats,
            )
        finally:
            peft_model.unmerge_adapter()

    med = {k: t.median_s for k, t in timings.items()}
    rows = []
    for (impl, variant), t in timings.items():
        rows.append(
            {
                "impl": impl,
                "forward": variant,
                "median_ms": t.median_s * 1e3,
                "min_ms": t.min_s * 1e3,
                "vs_base": ratio(t.median_s, med[(impl, "base")]),
                "vs_merged": ratio(t.median_s, med[(impl, "merged")]),
            }
        )
    ratios = {
        "unmerged_vs_base": ratio(med[("jaxlora", "unmerged")], med[("jaxlora", "base")]),
        "unmerged_vs_merged": ratio(med[("jaxlora", "unmerged")], med[("jaxlora", "merged")]),
        "merged_vs_base": ratio(med[("jaxlora", "merged")], med[("jaxlora", "base")]),
    }
    if peft_model is not None:
        ratios |= {
            "peft_unmerged_vs_base": ratio(med[("peft", "unmerged")], med[("peft", "base")]),
            "peft_unmerged_vs_merged": ratio(med[("peft", "unmerged")], med[("peft", "merged")]),
            "peft_vs_jaxlora_unmerged_time": ratio(
                med[("peft", "unmerged")], med[("jaxlora", "unmerged")]
            ),
        }
    return {
        "description": f"one adapter, rank {cfg.rank} on all 7 projections",
        "results": rows,
        "ratios": ratios,
        "checks": checks,
        "timings": {"/".join(k): t.as_json() for k, t in timings.items()},
    }
