"""jaxlora benchmarks: switching, overhead, mixed batches, decode and scale, next to PEFT.

Run all (or some) workloads; each prints a table and writes `<name>.json` (machine, versions,
sizes, medians of repeated runs, ratios computed within the run, correctness checks); see
`BENCHMARKS.md` and `specs/bench.md` (SW-BENCH-*).

Example:
    $ python -m benchmarks --quick --json-dir /tmp/bench --plot /tmp/bench/mixed.png
    $ python -m benchmarks --only switch --only mixed --repeats 3

This module imports only `argparse` at load time, so `--help` stays fast. It runs from a git
checkout only: the installed package has no `jaxlora bench` (SW-PKG-2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["WORKLOADS", "add_arguments", "config_from_args", "main", "run"]

#: workload name -> module under `benchmarks`, in the order they run.
WORKLOADS: dict[str, str] = {
    "switch": "switch",
    "overhead": "overhead",
    "mixed": "mixed",
    "decode": "decode",
    "scale": "scale",
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


_SIZE_OPTIONS: dict[str, tuple[Any, str]] = {
    "hidden": (int, "hidden size of the bench Llama"),
    "intermediate": (int, "MLP width"),
    "layers": (int, "decoder layers"),
    "heads": (int, "attention heads (= key/value heads)"),
    "vocab": (int, "vocabulary size"),
    "rank": (int, "LoRA rank of the overhead/mixed/decode adapters"),
    "batch": (int, "rows per batch"),
    "seq": (int, "tokens per row (the prompt length for decode)"),
    "warmup": (int, "untimed calls before timing"),
    "repeats": (int, "timed runs per variant (the median is reported)"),
    "switch_ranks": (_ints, "ranks of the switch adapters, e.g. 4,8,16,32"),
    "switch_adapters": (int, "adapters in the switch bank"),
    "switches": (int, "switches for the compile count"),
    "mixed_counts": (_ints, "distinct adapters per batch, e.g. 1,4,8,32"),
    "scale_counts": (_ints, "resident adapters, e.g. 1,2,100,1000"),
    "scale_rank": (int, "LoRA rank of the scale adapters"),
    "scale_peft_max": (int, "largest N for which PEFT set_adapter is measured"),
    "seed": (int, "random seed of weights and tokens"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m benchmarks` (the workload modules add them to their own)."""
    parser.add_argument(
        "--preset",
        choices=("full", "quick", "tiny"),
        default="full",
        help="size preset (full: the issue's bench model; quick: < 2 min on 2 cores; tiny: smoke)",
    )
    parser.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(WORKLOADS)}",
    )
    parser.add_argument("--json-dir", type=Path, default=None, help="write <name>.json here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write the mixed-batch plot (PNG) to this file"
    )
    parser.add_argument(
        "--no-peft", action="store_true", help="skip PEFT/PyTorch (jaxlora builds its own weights)"
    )
    for name, (kind, text) in _SIZE_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=text)


def config_from_args(args: argparse.Namespace):
    """The `BenchConfig` of the chosen preset with every size option given on the command line."""
    from ._harness import PRESETS

    config = PRESETS["quick" if args.quick else args.preset]
    changes = {k: getattr(args, k) for k in _SIZE_OPTIONS if getattr(args, k) is not None}
    if args.no_peft:
        changes["peft"] = False
    return dataclasses.replace(config, **changes)


def run(args: argparse.Namespace) -> int:
    """Run the selected workloads; 0 on success, 1 if a check failed, 2 on bad options."""
    from jaxlora.errors import JaxLoraError

    from ._runner import run_workloads

    try:
        return run_workloads(args)
    except JaxLoraError as err:
        print(f"python -m benchmarks: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks [options]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
