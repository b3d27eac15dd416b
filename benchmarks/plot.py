"""The mixed-batch plot: forward time vs distinct adapters in the batch (spec SW-BENCH-5).

One line per jaxlora routing method, the grouped per-adapter loop and PEFT's `adapter_names=`
forward; the base forward (no LoRA) is the dashed floor.

Example:
    $ python -m benchmarks.plot /tmp/bench/mixed.json /tmp/bench/mixed.png
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxlora.errors import ConfigError

__all__ = ["main", "plot_series", "write_plot"]


def plot_series(report: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """`variant -> [(distinct adapters, median ms)]` from a mixed report, in plotting order."""
    rows = report.get("results")
    if report.get("benchmark") != "mixed" or not rows:
        raise ConfigError(
            f"the plot needs the report of the `mixed` benchmark (mixed.json), got "
            f"{report.get('benchmark')!r} with {len(rows or [])} rows."
        )
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["variant"] in ("single", "peft base"):
            continue
        series.setdefault(row["variant"], []).append((row["distinct"], row["median_ms"]))
    return {k: sorted(v) for k, v in series.items()}


def write_plot(report: Mapping[str, Any], path: Path) -> Path:
    """Draw `plot_series(report)` into a PNG at `path` (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(report)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in series.items():
        xs, ys = zip(*points, strict=True)
        style = {"linestyle": "--", "color": "gray"} if name == "base" else {"marker": "o"}
        ax.plot(xs, ys, label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({x for pts in series.values() for x, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("distinct adapters in the batch")
    ax.set_ylabel("forward time, median ms (log)")
    machine = report.get("machine", {})
    load = machine.get("load_average") or []
    ax.set_title(
        f"{textwrap.fill(report.get('description', ''), 100)}\n{machine.get('backend', '?')}, "
        f"{machine.get('cpu_count', '?')} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in load) or '?'}",
        fontsize=8,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.plot MIXED_JSON OUT_PNG`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m benchmarks.plot MIXED_JSON OUT_PNG", file=sys.stderr)
        return 2
    write_plot(json.loads(Path(args[0]).read_text()), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
