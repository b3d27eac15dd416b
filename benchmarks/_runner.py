"""Run the selected workloads: build the bench model once, print tables, write JSON and the plot.

Example:
    >>> evaluate_targets({"x": 1.01}, {"x": ("<=", 1.02)})["x"]["met"]
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import operator
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxlora.errors import ConfigError, format_names

from . import WORKLOADS, config_from_args
from ._harness import BenchConfig, format_table, machine_info, write_report

__all__ = ["evaluate_targets", "run_workloads", "selected_workloads"]

_COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, "==": operator.eq}


def evaluate_targets(
    ratios: Mapping[str, Any], targets: Mapping[str, tuple[str, float]]
) -> dict[str, dict[str, Any]]:
    """`name -> {value, target, met}` for every target whose ratio was measured."""
    out = {}
    for name, (op, limit) in targets.items():
        value = ratios.get(name)
        met = None if value is None else bool(_COMPARE[op](value, limit))
        out[name] = {"value": value, "target": f"{op} {limit:g}", "met": met}
    return out


def selected_workloads(only: list[str] | None) -> list[str]:
    """The workloads to run, in `WORKLOADS` order; unknown names raise `ConfigError`."""
    if not only:
        return list(WORKLOADS)
    wanted = {n.strip() for item in only for n in item.split(",") if n.strip()}
    unknown = sorted(wanted - set(WORKLOADS))
    if unknown:
        raise ConfigError(
            f"unknown benchmark {format_names(unknown)}; choose from {format_names(WORKLOADS)} "
            "(e.g. --only switch --only mixed)."
        )
    return [n for n in WORKLOADS if n in wanted]


def _validate(config: BenchConfig, names: list[str], plot: Path | None) -> None:
    if config.hidden % config.heads or config.head_dim % 2:
        raise ConfigError(
            f"--hidden {config.hidden} must be a multiple of --heads {config.heads} with an even "
            f"head size (RoPE), got head size {config.hidden / config.heads:g}; e.g. --hidden "
            f"{config.heads * 64} --heads {config.heads}."
        )
    if plot is not None and "mixed" not in names:
        raise ConfigError(
            f"--plot {plot} draws the mixed-batch workload, which is not selected (selected: "
            f"{format_names(names)}); add --only mixed or drop --plot."
        )


def _print_report(name: str, report: Mapping[str, Any]) -> None:
    print(f"\n== {name}: {report['description']}")
    print(format_table(report["results"]))
    if report["ratios"]:
        rows = []
        for key, value in report["ratios"].items():
            target = report["targets"].get(key)
            rows.append(
                {
                    "ratio": key,
                    "value": "-" if value is None else value,
                    "target": target["target"] if target else "",
                    "met": "" if target is None or target["met"] is None else target["met"],
                }
            )
        print(format_table(rows))
    failed = [k for k, c in report["checks"].items() if not c["ok"]]
    worst = max((c["value"] for c in report["checks"].values()), default=0.0)
    print(
        f"checks: {len(report['checks']) - len(failed)}/{len(report['checks'])} agree within "
        f"SW-TOL-1 (worst {worst:.2e})" + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )


def run_workloads(args: argparse.Namespace) -> int:
    """Run what `args` selects; returns 0, or 1 if any correctness check failed."""
    config = config_from_args(args)
    names = selected_workloads(args.only)
    _validate(config, names, args.plot)
    if config.peft and importlib.util.find_spec("peft") is None:
        print("peft is not installed: running without the PEFT side (--no-peft)")
        config = dataclasses.replace(config, peft=False)
    from ._setup import Setup

    machine = machine_info()
    print(
        f"jaxlora benchmarks on {machine['backend']} ({', '.join(sorted(set(machine['devices'])))}"
        f"), {machine['cpu_count']} CPUs, load average {machine['load_average']}"
    )
    reports: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="jaxlora-bench-") as tmp:
        setup = Setup.build(config, Path(tmp) if config.peft else None)
        for name in names:
            module = importlib.import_module(f"benchmarks.{WORKLOADS[name]}")
            start = time.perf_counter()
            report = module.run(setup)
            report = {
                "benchmark": name,
                **report,
                "targets": evaluate_targets(report["ratios"], module.TARGETS),
                "config": dataclasses.asdict(config),
                "machine": machine | {"load_average_end": _load()},
                "wall_s": time.perf_counter() - start,
            }
            reports[name] = report
            _print_report(name, report)
            path = write_report(args.json_dir, name, report)
            if path is not None:
                print(f"wrote {path}")
    if args.plot is not None:
        from .plot import write_plot

        write_plot(reports["mixed"], args.plot)
        print(f"wrote {args.plot}")
    failed = [f"{n}:{k}" for n, r in reports.items() for k, c in r["checks"].items() if not c["ok"]]
    if failed:
        print(f"correctness checks FAILED (timings not comparable): {', '.join(failed)}")
        return 1
    return 0


def _load() -> list[float] | None:
    import os

    try:
        return list(os.getloadavg())
    except OSError:
        return None
