"""XLA's own cost model for the bench forwards: FLOPs and bytes accessed per variant.

Explains a ratio without timing noise: how much work LoRA adds to the compiled forward (base,
one adapter, one mixed batch per routing kernel), as `compiled.cost_analysis()` counts it.

Example:
    $ python -m benchmarks.costs --hidden 512 --layers 4 --batch 32 --seq 64
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import jaxlora
from jaxlora.models import init_cache

from . import add_arguments, config_from_args
from ._harness import format_table
from ._setup import Setup

__all__ = ["forward_costs", "main"]


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"))
def _logits(graphdef, state, tokens, lora, routing):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1], model.dtype)
    return model.run(tokens, cache, jnp.ones(tokens.shape, bool), lora, routing)[0]


def forward_costs(setup: Setup, distinct: int = 8) -> list[dict[str, Any]]:
    """One row per variant: GFLOPs and MB accessed of the compiled forward, and vs base."""
    cfg, model = setup.config, setup.model
    bank = jaxlora.AdapterBank(
        {f"c{i}": setup.random_adapter_arrays(cfg.rank, seed=i) for i in range(distinct)}
    )
    stacked = jaxlora.stack(bank)
    ids = jnp.arange(cfg.batch, dtype=jnp.int32) % distinct
    tokens = jnp.asarray(setup.tokens(cfg.batch, cfg.seq))
    graphdef, state = nnx.split(model)
    variants = {"base": (None, "auto"), "single": (jaxlora.select(bank, "c0"), "auto")}
    for routing in cfg.methods:
        variants[f"mixed{distinct}/{routing}"] = (jaxlora.Routed(stacked, ids), routing)
    rows = []
    for name, (lora, routing) in variants.items():
        compiled = _logits.lower(graphdef, state, tokens, lora, routing).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        rows.append(
            {
                "variant": name,
                "gflops": cost.get("flops", 0.0) / 1e9,
                "mb_accessed": cost.get("bytes accessed", 0.0) / 2**20,
            }
        )
    for row in rows:
        row["flops_vs_base"] = row["gflops"] / rows[0]["gflops"]
        row["bytes_vs_base"] = row["mb_accessed"] / rows[0]["mb_accessed"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.costs [size options]`: print the cost table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.costs")
    add_arguments(parser)
    parser.add_argument("--distinct", type=int, default=8, help="distinct adapters (mixed)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    import dataclasses

    setup = Setup.build(dataclasses.replace(config, peft=False), None)
    print(format_table(forward_costs(setup, args.distinct)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
