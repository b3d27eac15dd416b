"""Timing, compile counting, machine info and report writing shared by every benchmark.

Timings are medians of repeated runs after warm-up; variants that are compared are timed
interleaved (one run of each per round, the order rotated every round), so a load spike on a
shared machine hits all of them alike and ratios computed within one run stay meaningful.

Example:
    >>> import jax.numpy as jnp
    >>> t = time_interleaved({"x2": lambda: jnp.ones(4) * 2}, warmup=1, repeats=3)
    >>> len(t["x2"].samples_s)
    3
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax

__all__ = [
    "PRESETS",
    "BenchConfig",
    "Timing",
    "count_compiles",
    "format_table",
    "live_bytes",
    "machine_info",
    "per_call_seconds",
    "ratio",
    "time_interleaved",
    "write_report",
]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Every size a benchmark uses (all are CLI options; see `PRESETS`).

    The bench model is a Llama (`jaxlora.models`) with `layers` decoder layers of width
    `hidden`; LoRA rank `rank` on all 7 projections unless stated.
    """

    hidden: int = 512
    intermediate: int = 1376
    layers: int = 4
    heads: int = 8
    vocab: int = 1024
    rank: int = 16
    batch: int = 32
    seq: int = 64
    warmup: int = 1
    repeats: int = 7
    switch_ranks: tuple[int, ...] = (4, 8, 16, 32)
    switch_adapters: int = 16
    switches: int = 100
    mixed_counts: tuple[int, ...] = (1, 4, 8, 32)
    methods: tuple[str, ...] = ("gather", "onehot", "ragged", "auto")
    scale_counts: tuple[int, ...] = (1, 2, 100, 1000)
    scale_rank: int = 16
    scale_peft_max: int = 100
    peft: bool = True
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


#: Named size sets: `full` is the issue's bench model, `quick` runs everything in < 2 minutes
#: on 2 CPU cores, `tiny` proves the scripts work (the smoke test).
PRESETS: dict[str, BenchConfig] = {
    "full": BenchConfig(),
    "quick": BenchConfig(
        hidden=128,
        intermediate=344,
        layers=2,
        heads=4,
        vocab=256,
        batch=32,
        seq=16,
        repeats=5,
        switches=100,
        scale_counts=(1, 2, 100, 1000),
        scale_rank=8,
        scale_peft_max=100,
    ),
    "tiny": BenchConfig(
        hidden=32,
        intermediate=64,
        layers=1,
        heads=2,
        vocab=64,
        rank=4,
        batch=4,
        seq=4,
        warmup=1,
        repeats=1,
        switch_ranks=(2, 4),
        switch_adapters=4,
        switches=8,
        mixed_counts=(1, 4),
        methods=("onehot", "auto"),  # two kernels: each one is a compilation per workload
        scale_counts=(1, 2, 8),
        scale_rank=2,
        scale_peft_max=2,
    ),
}


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per run: the median and minimum of `samples_s`."""

    samples_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    def as_json(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "min_s": self.min_s, "samples_s": list(self.samples_s)}


def _block(out: Any) -> None:
    leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
    if leaves:
        jax.block_until_ready(leaves)


def time_interleaved(
    variants: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int
) -> dict[str, Timing]:
    """Time each zero-argument callable `repeats` times, round robin, after `warmup` calls.

    A JAX result is waited for (`jax.block_until_ready`), so the time covers the computation,
    not only its dispatch.
    """
    for fn in variants.values():
        for _ in range(warmup):
            _block(fn())
    samples: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(repeats):
        # Rotate the order every round: no variant always runs right after a heavy one.
        for name in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            _block(variants[name]())
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def per_call_seconds(fn: Callable[[int], Any], *, calls: int, repeats: int) -> Timing:
    """Time a cheap host-side operation: `fn(i)` for `calls` values of i, per call.

    Each sample is the mean over `calls` calls (to rise above the clock's resolution).
    """
    fn(0)
    samples = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(r * calls + i)
        samples.append((time.perf_counter() - start) / calls)
    return Timing(tuple(samples))


@contextmanager
def count_compiles() -> Iterator[list[int]]:
    """Count XLA backend compilations inside the block: `with count_compiles() as n: ...; n[0]`.

    Uses `jax.monitoring` events, so it sees every compilation (any jitted function, eager ops
    included), not only one function's cache.
    """
    counter = [0]

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counter[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def live_bytes() -> int:
    """Bytes held by live JAX arrays on the default backend (all devices)."""
    return sum(x.nbytes for x in jax.live_arrays())


def ratio(numerator: float, denominator: float) -> float:
    """`numerator / denominator`, `inf` when the denominator is 0."""
    return numerator / denominator if denominator else float("inf")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Where and with what the benchmark ran: host, devices, load, package versions."""
    packages = ("jax", "jaxlib", "flax", "numpy", "torch", "peft", "transformers", "jaxlora")
    devices = jax.devices()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in packages},
        "git_commit": _git_commit(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}"
        return f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table; `columns` default to the first row's keys.

    Example:
        >>> print(format_table([{"a": 1, "b": 0.5}]))
        a  b
        1  0.500
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_report(json_dir: Path | None, name: str, report: Mapping[str, Any]) -> Path | None:
    """Write `report` to `json_dir/<name>.json` atomically (temp file + `os.replace`)."""
    if json_dir is None:
        return None
    json_dir.mkdir(parents=True, exist_ok=True)
    target = json_dir / f"{name}.json"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
