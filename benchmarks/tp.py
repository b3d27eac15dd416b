"""Tensor parallelism on fake CPU devices: sharded vs unsharded step time, bytes per device.

One run, ratios only (spec SW-TP-1, SW-TP-2, SW-TP-5): a mixed-batch prefill forward and a
decode step of the same Llama with a routed bank, unsharded (one device) and on `(data, model)`
meshes of the `--devices` fake CPU devices, with each LoRA layout (`--layouts`:
`replicate-factors`, `split-factors`); the compiled collectives of the base and LoRA forwards;
the bytes one device holds of the weights and of the stacked bank, over the total.

The fake devices (`--xla_force_host_platform_device_count`) share the machine's cores, so a
sharded step cannot be faster here: the ratio measures what partitioning costs (collectives,
more and smaller kernels), not a speedup. Bytes per device are exact on any hardware.

Example:
    $ python -m benchmarks.tp --json-dir benchmarks/results
    $ python -m benchmarks.tp --hidden 64 --layers 1 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "run"]


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tp", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--meshes", default="1x8,2x4,4x2", help="data x model meshes")
    p.add_argument(
        "--layouts", default="replicate-factors,split-factors", help="LoRA layouts (SW-TP-5)"
    )
    p.add_argument("--json-dir", type=Path, default=None)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure; returns the report (also printed as tables)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import jaxlora
    from jaxlora import reference
    from jaxlora.models import Llama, LlamaConfig, forward, init_cache, tp
    from jaxlora.sharding import device_bytes, make_mesh, shard_batch

    from ._harness import format_table, machine_info, time_interleaved

    if jax.device_count() < args.devices:
        raise SystemExit(
            f"{jax.device_count()} devices but --devices {args.devices}: run in a fresh process "
            "(XLA_FLAGS is set before JAX starts)."
        )
    head_dim = args.hidden // args.heads
    config = LlamaConfig(
        args.vocab,
        args.hidden,
        args.intermediate,
        args.layers,
        args.heads,
        args.kv_heads,
        head_dim,
    )
    model = Llama.random(config, seed=0)
    lcfg = jaxlora.LoraConfig(r=args.rank, target_modules="all-linear", init_lora_weights=False)
    bank = jaxlora.AdapterBank()
    for i in range(args.adapters):
        adapter = jaxlora.init_adapter(jax.random.key(i), lcfg, model.lora_shapes())
        bank = bank.add(f"a{i}", adapter)
    stacked = jaxlora.stack(bank)
    rows = [f"a{i % args.adapters}" for i in range(args.batch)]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    step_tokens = tokens[:, :1]

    @functools.partial(jax.jit, static_argnames=("graphdef",))
    def decode(graphdef, state, token, cache, lora):
        return nnx.merge(graphdef, state).run(token, cache, None, lora, "auto")

    def decode_fn(m, lora, token, cache):
        graphdef, state = nnx.split(m)
        return lambda: decode(graphdef, state, token, cache, lora)

    def collectives(m, x, lora) -> dict[str, int]:
        graphdef, state = nnx.split(m)
        lowered = jax.jit(
            lambda s, t, lo: nnx.merge(graphdef, s).run(
                t, init_cache(config, t.shape[0], t.shape[1], jnp.float32), None, lo, "auto"
            )[0]
        ).lower(state, x, lora)
        kinds = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
        found = re.findall(rf"\b({kinds})\(", lowered.compile().as_text())
        return {k: found.count(k) for k in sorted(set(found))}

    routed = stacked.route(rows)
    cache = init_cache(config, args.batch, args.seq + 1, jnp.float32)
    variants = {
        "unsharded/prefill": lambda: forward(model, tokens, lora=routed),
        "unsharded/decode": decode_fn(model, routed, jnp.asarray(step_tokens), cache),
    }
    weights_total = sum(v.nbytes for v in model.tensors().values())
    bank_total = sum(leaf.nbytes for leaf in jax.tree.leaves(stacked))
    want = np.asarray(forward(model, tokens, lora=routed))
    layouts = args.layouts.split(",")
    memory, comms = [], []
    for spec in args.meshes.split(","):
        data, m = (int(v) for v in spec.split("x"))
        mesh = make_mesh(data=data, model=m)
        sharded = tp.shard_model(model, mesh)
        x = shard_batch(tokens, mesh)
        t1 = shard_batch(step_tokens, mesh)
        scache = tp.shard_cache(cache, config, mesh)
        w = max(device_bytes(sharded.tensors()).values())
        base_c = collectives(sharded, x, None)
        for layout in layouts:
            lora = tp.shard_lora(routed, config, mesh, lora_layout=layout)
            name = f"{spec}/{layout}"
            variants[f"{name}/prefill"] = functools.partial(forward, sharded, x, lora=lora)
            variants[f"{name}/decode"] = decode_fn(sharded, lora, t1, scache)
            got = np.asarray(forward(sharded, x, lora=lora))
            ok, err, bound = reference.allclose(got, want.astype(np.float64), "float32")
            b = max(device_bytes(lora.stacked).values())
            memory.append(
                {
                    "mesh": spec,
                    "lora_layout": layout,
                    "weights_MB_per_device": w / 1e6,
                    "weights_vs_total": w / weights_total,
                    "one_over_model": 1 / m,
                    "bank_MB_per_device": b / 1e6,
                    "bank_vs_total": b / bank_total,
                    "equal_unsharded": bool(ok),
                    "max_err": float(err),
                    "bound": float(bound),
                }
            )
            comms.append(
                {
                    "mesh": spec,
                    "lora_layout": layout,
                    "base": str(base_c),
                    "lora": str(collectives(sharded, x, lora)),
                }
            )
    slot_mesh = make_mesh(data=1, slot=2, model=args.devices // 2)
    slot_bank = tp.shard_lora(routed, config, slot_mesh, mode="slot").stacked
    slot_bytes = max(device_bytes(slot_bank).values())
    memory.append(
        {
            "mesh": f"1x2x{args.devices // 2} (slot)",
            "bank_MB_per_device": slot_bytes / 1e6,
            "bank_vs_total": slot_bytes / bank_total,
            "one_over_model": 2 / args.devices,
        }
    )
    timings = time_interleaved(variants, warmup=1, repeats=args.repeats)
    times = []
    for name, t in timings.items():
        spec, *layout, kind = name.split("/")
        base = timings[f"unsharded/{kind}"].median_s
        row = {"variant": name, "median_ms": t.median_s * 1e3, "vs_unsharded": t.median_s / base}
        if layout:  # the first layout's time on the same mesh, for the ratio between layouts
            row["vs_first_layout"] = t.median_s / timings[f"{spec}/{layouts[0]}/{kind}"].median_s
        times.append(row)
    print(format_table(times, ["variant", "median_ms", "vs_unsharded", "vs_first_layout"]))
    print()
    print(format_table(memory))
    print()
    print(format_table(comms))
    return {
        "name": "tp",
        "machine": machine_info(),
        "sizes": {k: v for k, v in vars(args).items() if k != "json_dir"},
        "weights_total_MB": weights_total / 1e6,
        "bank_total_MB": bank_total / 1e6,
        "times": times,
        "memory": memory,
        "collectives": comms,
        "timings": {name: t.as_json() for name, t in timings.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    report = run(args)
    from ._harness import write_report

    path = write_report(args.json_dir, "tp", report)
    if path is not None:
        print(f"wrote {path}")
    return 0 if all(row.get("equal_unsharded", True) for row in report["memory"]) else 1


if __name__ == "__main__":
    sys.exit(main())
