"""`jaxlora bench`: the benchmarks of `python -m benchmarks`, same options, same code.

Example:
    $ jaxlora bench --quick --json-dir /tmp/bench --plot /tmp/bench/mixed.png
    $ jaxlora bench --only scale --scale-counts 1,2,100
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from benchmarks import add_arguments as bench_arguments

    bench_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from benchmarks import run as run_benchmarks

    return run_benchmarks(args)
