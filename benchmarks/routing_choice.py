"""Measure the mixed-batch routing kernels to justify `routing.choose_routing` (spec SW-ROUTE-3).

Run: `.venv/bin/python -m benchmarks.routing_choice` (a few seconds per row). Prints, per shape,
the median time of each kernel (ms, jitted, after one warm-up call) and the kernel `auto` picks.
Times are for comparing kernels on one machine in one run, not absolute numbers.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from jaxlora.routing import choose_routing, routed_delta
from jaxlora.types import LoraWeights

SHAPES = [
    (8, 1, 4),
    (8, 1, 8),
    (8, 1, 16),
    (64, 1, 4),
    (64, 1, 8),
    (64, 1, 16),
    (64, 1, 32),
    (64, 1, 64),
    (8, 16, 4),
    (8, 128, 4),
    (8, 128, 16),
]
KERNELS = ("gather", "onehot", "ragged")


def median_ms(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(d_in: int = 256, d_out: int = 256, rank: int = 8) -> None:
    key = jax.random.key(0)
    print(f"in={d_in} out={d_out} R={rank} float32, median ms over 20 runs")
    print(f"{'B x T':>10} {'S':>4} " + " ".join(f"{k:>8}" for k in KERNELS) + "    auto")
    for batch, tokens, slots in SHAPES:
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, slots * batch + tokens), 4)
        st = LoraWeights(
            jax.random.normal(k1, (slots, d_in, rank)),
            jax.random.normal(k2, (slots, rank, d_out)),
            jnp.ones((slots,)),
        )
        shape = (batch, d_in) if tokens == 1 else (batch, tokens, d_in)
        x = jax.random.normal(k3, shape)
        ids = jax.random.randint(k4, (batch,), -1, slots)
        row = []
        for kernel in KERNELS:
            fn = jax.jit(lambda x, st, ids, k=kernel: routed_delta(x, st, ids, routing=k))
            row.append(median_ms(fn, x, st, ids))
        picked = choose_routing(x.shape, st)
        label = f"{batch} x {tokens}"
        print(f"{label:>10} {slots:>4} " + " ".join(f"{t:8.2f}" for t in row) + f"    {picked}")


if __name__ == "__main__":
    main()
