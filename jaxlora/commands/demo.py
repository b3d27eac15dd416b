"""`jaxlora switch-demo`: switch one jitted forward through 8 different adapters and check it.

Builds a small base `DenseChain` from random weights and a bank of 8 adapters with different
ranks, alphas, rsLoRA flags, rank/alpha patterns and target sets; conforms the bank
(spec SW-CONFORM-1..3); then, for every adapter, times `select` + the jitted forward (median of a
few runs) and compares the output with the float64 NumPy oracle under the spec's tolerance
(SW-TOL-1). The base model (no adapter) must be bit-identical to the forward without adapter
machinery (SW-ACTIVE-2), and the whole switch must cost exactly one compilation.

Exit status 0 when every check holds, 1 otherwise.

Example:
    $ jaxlora switch-demo --seed 1 --json demo.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Any

#: (name, r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern)
ADAPTERS: tuple[tuple[str, int, float, bool, Any, dict, dict], ...] = (
    ("tiny-q", 1, 2.0, False, ["q"], {}, {}),
    ("v-rslora", 2, 4.0, True, ["v"], {}, {}),
    ("head-only", 4, 8.0, False, ["head"], {}, {}),
    ("block0", 8, 16.0, False, r"blocks\.0\..*", {}, {}),
    ("all-rslora", 16, 8.0, True, "all-linear", {}, {}),
    ("qv-patterns", 12, 16.0, False, ["q", "v"], {"v": 6}, {"blocks.1.q": 48.0}),
    ("block1-wide", 32, 16.0, False, r"blocks\.1\..*", {}, {}),
    ("rank64", 64, 64.0, True, "all-linear", {}, {}),
)
PATHS = ("embed", "blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v", "head")
WIDTHS = (32, 64, 64, 64, 64, 64, 16)
BATCH = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options."""
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed runs per adapter; the median is shown"
    )


@dataclasses.dataclass
class Demo:
    """The demo's inputs, for jaxlora and for the oracle."""

    model: Any  # jaxlora.DenseChain
    layers64: list  # oracle copy: [(path, W, c)] in float64
    bank: Any  # jaxlora.AdapterBank (not conformed)
    refs: dict  # name -> jaxlora.reference.RefAdapter
    x: Any
    x64: Any


def build(seed: int) -> Demo:
    """The base model, the 8 adapters and an input, from `seed` (NumPy random numbers)."""
    import jax.numpy as jnp
    import numpy as np

    import jaxlora
    from jaxlora import reference

    rng = np.random.default_rng(seed)

    def f32(shape, scale):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    layers = {
        p: (f32((WIDTHS[i], WIDTHS[i + 1]), WIDTHS[i] ** -0.5), f32((WIDTHS[i + 1],), 0.1))
        for i, p in enumerate(PATHS)
    }
    model = jaxlora.DenseChain.from_layers(layers, dtype=jnp.float32)
    shapes = model.layer_shapes()
    bank, refs = jaxlora.AdapterBank(), {}
    for name, r, alpha, rslora, targets, rank_pattern, alpha_pattern in ADAPTERS:
        config = jaxlora.LoraConfig(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )
        factors = {}
        for path in jaxlora.match_targets(targets, shapes):
            d_in, d_out = shapes[path]
            rank = config.rank_for(path)
            factors[path] = (f32((d_in, rank), d_in**-0.5), f32((rank, d_out), 0.5 * rank**-0.5))
        bank = bank.add(name, jaxlora.make_adapter(config, factors))
        refs[name] = reference.RefAdapter(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            weights={
                p: (np.asarray(a, np.float64), np.asarray(b, np.float64))
                for p, (a, b) in factors.items()
            },
        )
    layers64 = [(p, np.float64(w), np.float64(c)) for p, (w, c) in layers.items()]
    x = f32((BATCH, WIDTHS[0]), 1.0)
    return Demo(model, layers64, bank, refs, jnp.asarray(x), np.float64(x))


def run_demo(seed: int = 0, repeats: int = 7) -> dict[str, Any]:
    """Switch through every adapter; returns the results (see `format_table`)."""
    import jax
    import numpy as np

    import jaxlora
    from jaxlora import reference

    demo = build(seed)
    conformed = jaxlora.conform(demo.bank)
    traces = []

    def switched(model, x, active):
        traces.append(1)  # runs once per trace, never at run time
        return jaxlora.forward(model, x, active)

    forward: Any = jax.jit(switched)  # Any: `_cache_size` is not in jax's type stubs
    rows = []
    for name in demo.bank.names:
        # the first run may compile: not timed
        y = forward(demo.model, demo.x, jaxlora.select(conformed, name)).block_until_ready()
        timings = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            y = forward(demo.model, demo.x, jaxlora.select(conformed, name))
            y.block_until_ready()
            timings.append(time.perf_counter() - start)
        want = reference.chain_forward(demo.layers64, demo.x64, [demo.refs[name]])
        ok, err, allowed = reference.allclose(np.asarray(y), want, str(y.dtype))
        adapter = demo.bank[name]
        rows.append(
            {
                "adapter": name,
                "rank": sorted({w.rank for w in adapter.values()}),
                "targets": list(adapter),
                "max_deviation": err,
                "allowed": allowed,
                "switch_ms": statistics.median(timings) * 1e3,
                "compiles_so_far": forward._cache_size(),
                "ok": bool(ok and forward._cache_size() == 1),
            }
        )
    compiles = forward._cache_size()
    # SW-ACTIVE-2: no adapter -> bit-identical to the model without adapter machinery
    base = jax.jit(lambda m, x: jaxlora.forward(m, x, jaxlora.select(conformed, None)))
    plain = jax.jit(_plain_forward)
    base_y = np.asarray(base(demo.model, demo.x))
    base_bitwise = bool(np.array_equal(base_y, np.asarray(plain(demo.model, demo.x))))
    base_ok, base_err, base_allowed = reference.allclose(
        base_y, reference.chain_forward(demo.layers64, demo.x64, []), str(base_y.dtype)
    )
    checks_ok = all(r["ok"] for r in rows) and compiles == 1 and len(traces) == 1
    return {
        "seed": seed,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "adapters": rows,
        "compile_count": compiles,
        "trace_count": len(traces),
        "base": {
            "bitwise_equal_to_plain_model": base_bitwise,
            "max_deviation": base_err,
            "allowed": base_allowed,
            "ok": bool(base_ok and base_bitwise),
        },
        "ok": bool(checks_ok and base_ok and base_bitwise),
    }


def _plain_forward(model, x):
    """SW-MODEL-1 written out, with no adapter code at all."""
    import jax.numpy as jnp

    h = x
    for i, (kernel, bias) in enumerate(zip(model.kernels, model.biases, strict=True)):
        h = h @ kernel + bias
        if i < len(model.kernels) - 1:
            h = jnp.tanh(h)
    return h


def format_table(results: dict[str, Any]) -> str:
    """The per-adapter table and the summary lines."""
    header = (
        f"{'adapter':<12} {'rank':>7} {'layers':>6}  {'targets':<40} "
        f"{'max |dev|':>9} {'allowed':>8} {'switch ms':>9} {'compiles':>8}  check"
    )
    lines = [header, "-" * len(header)]
    for r in results["adapters"]:
        rank = "/".join(str(k) for k in r["rank"])
        targets = ",".join(r["targets"])
        if len(targets) > 40:
            targets = targets[:37] + "..."
        lines.append(
            f"{r['adapter']:<12} {rank:>7} {len(r['targets']):>6}  {targets:<40} "
            f"{r['max_deviation']:>9.2e} {r['allowed']:>8.1e} {r['switch_ms']:>9.3f} "
            f"{r['compiles_so_far']:>8}  "
            f"{'ok' if r['ok'] else 'FAIL'}"
        )
    base = results["base"]
    compiles = results["compile_count"]
    lines += [
        "-" * len(header),
        f"base (no adapter): bitwise equal to the plain model: "
        f"{'yes' if base['bitwise_equal_to_plain_model'] else 'NO'}; max |dev| "
        f"{base['max_deviation']:.2e} (allowed {base['allowed']:.1e})",
        f"compile count of the switched forward: {compiles} (traces: {results['trace_count']}; "
        f"must be 1) {'ok' if compiles == 1 and results['trace_count'] == 1 else 'FAIL'}",
        f"jax {results['jax_version']} on {results['backend']}, seed {results['seed']}: "
        + ("all checks passed" if results["ok"] else "SOME CHECKS FAILED"),
    ]
    return "\n".join(lines)


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """Write `data` as JSON to `path`, atomically and durably (`jaxlora.io.atomic_write`)."""
    from jaxlora.io import atomic_write

    atomic_write(path, json.dumps(data, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    """Run the demo, print the table, optionally write JSON; 0 if every check passed."""
    print(
        f"jaxlora switch-demo: {len(ADAPTERS)} adapters over a {len(PATHS)}-layer DenseChain "
        f"(widths {'-'.join(map(str, WIDTHS))}), batch {BATCH}, float32. The bank is conformed "
        f"(every adapter zero-padded to rank {max(a[1] for a in ADAPTERS)} on all {len(PATHS)} "
        "layers); one jitted forward is switched "
        "by select(); 'switch ms' = select + forward, median; 'compiles' = compilations so far."
    )
    results = run_demo(args.seed, args.repeats)
    print(format_table(results))
    if args.json:
        write_json_atomically(args.json, results)
        print(f"results written to {args.json}")
    sys.stdout.flush()
    return 0 if results["ok"] else 1
