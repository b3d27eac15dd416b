"""Workload 1, switch cost: `select` + jitted forward vs the same forward with a fixed adapter.

Measures (spec SW-BENCH-1..3), on a conformed bank of `switch_adapters` adapters whose ranks
cycle through `switch_ranks` (padded to the largest):
- the forward with a fixed, preselected adapter, and `select` + forward switching every call;
- switch latency alone: `jaxlora.select` vs PEFT `set_adapter` on the same adapters;
- XLA compilations over `switches` switches (after a base forward of the same batch shape
  warmed every eager helper, so the count is the LoRA forward's own compilations).
Checks first: the switched forward equals the unconformed adapter's forward (padding changes
nothing) and, with PEFT, PEFT's logits with that adapter active.

Run: `python -m benchmarks --only switch`.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax.numpy as jnp

import jaxlora
from jaxlora.models import forward

from ._harness import count_compiles, per_call_seconds, ratio, time_interleaved
from ._setup import Setup, agreement, tol_check, torch_forward

__all__ = ["NAME", "TARGETS", "run"]

NAME = "switch"

#: ratio name -> (comparison, limit): the issue's targets for this workload.
TARGETS = {
    "select_forward_vs_fixed": ("<=", 1.02),
    "compiles_over_switches": ("==", 1),
    "peft_set_adapter_vs_select": (">=", 100.0),
}


def run(setup: Setup) -> dict[str, Any]:
    """Run the workload; returns the report (results, ratios, checks, compile counts)."""
    cfg, model = setup.config, setup.model
    ranks = {
        f"s{i}": cfg.switch_ranks[i % len(cfg.switch_ranks)] for i in range(cfg.switch_adapters)
    }
    bank, peft_model = setup.adapters("switch", ranks)
    conformed = jaxlora.conform(bank)
    names = conformed.names
    tokens_np = setup.tokens(cfg.batch, cfg.seq)
    tokens = jnp.asarray(tokens_np)

    forward(model, tokens).block_until_ready()  # warms the eager helpers of this batch shape
    jaxlora.select(conformed, names[0])  # and `select`'s (it builds the gate array eagerly)
    with count_compiles() as compiles:
        for i in range(cfg.switches):
            lora = jaxlora.select(conformed, names[i % len(names)])
            forward(model, tokens, lora=lora).block_until_ready()

    checks: dict[str, Any] = {}
    probe = names[0]  # the smallest rank: the most padding
    ours = forward(model, tokens, lora=jaxlora.select(conformed, probe))
    unpadded = forward(model, tokens, lora=jaxlora.select(bank, probe))
    checks["conformed_equals_unpadded"] = tol_check(agreement(ours, unpadded))
    if peft_model is not None:
        peft_model.set_adapter(probe)
        checks["equals_peft"] = tol_check(agreement(ours, torch_forward(peft_model, tokens_np)))

    fixed = jaxlora.select(conformed, names[0])
    turn = itertools.count()
    timings = time_interleaved(
        {
            "fixed adapter forward": lambda: forward(model, tokens, lora=fixed),
            "select + forward": lambda: forward(
                model, tokens, lora=jaxlora.select(conformed, names[next(turn) % len(names)])
            ),
        },
        warmup=cfg.warmup,
        repeats=2 * cfg.repeats + 1,
    )
    latency = {
        "jaxlora select": per_call_seconds(
            lambda i: jaxlora.select(conformed, names[i % len(names)]),
            calls=1000,
            repeats=cfg.repeats,
        )
    }
    if peft_model is not None:
        latency["peft set_adapter"] = per_call_seconds(
            lambda i: peft_model.set_adapter(names[i % len(names)]),
            calls=20,
            repeats=cfg.repeats,
        )
    fixed_s = timings["fixed adapter forward"].median_s
    rows = [
        {"measure": k, "median_ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3, "vs_fixed": ""}
        for k, t in timings.items()
    ]
    rows[1]["vs_fixed"] = ratio(timings["select + forward"].median_s, fixed_s)
    rows += [
        {"measure": f"{k} (latency)", "median_ms": t.median_s * 1e3, "min_ms": t.min_s * 1e3}
        for k, t in latency.items()
    ]
    ratios = {
        "select_forward_vs_fixed": ratio(timings["select + forward"].median_s, fixed_s),
        "compiles_over_switches": compiles[0],
    }
    if "peft set_adapter" in latency:
        ratios["peft_set_adapter_vs_select"] = ratio(
            latency["peft set_adapter"].median_s, latency["jaxlora select"].median_s
        )
    return {
        "description": (
            f"{cfg.switches} switches among {len(names)} adapters of ranks "
            f"{sorted(set(ranks.values()))} (conformed to {max(ranks.values())})"
        ),
        "results": rows,
        "ratios": ratios,
        "checks": checks,
        "timings": {k: t.as_json() for k, t in {**timings, **latency}.items()},
    }
