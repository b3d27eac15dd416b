"""The targets table of BENCHMARKS.md, from the JSON reports of one run.

Example:
    $ python -m benchmarks.summary /tmp/bench
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "markdown_table"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def markdown_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown row per target: workload, ratio, measured value, target, met."""
    lines = ["| workload | ratio | measured | target | met |", "|---|---|---|---|---|"]
    for name, report in reports.items():
        for key, target in report.get("targets", {}).items():
            met = {True: "yes", False: "**no**", None: "-"}[target["met"]]
            row = [name, f"`{key}`", _fmt(target["value"]), target["target"], met]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.summary JSON_DIR`: print the table."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m benchmarks.summary JSON_DIR", file=sys.stderr)
        return 2
    from . import WORKLOADS

    found = {p.stem: p for p in Path(args[0]).glob("*.json")}
    reports = {n: json.loads(found[n].read_text()) for n in WORKLOADS if n in found}
    print(markdown_table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
