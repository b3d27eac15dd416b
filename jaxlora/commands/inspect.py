"""`jaxlora inspect DIR`: a table of the adapters in a PEFT directory (spec SW-CLI-3).

One row per adapter ("default" in the root, others in sub-directories): targeted module names,
ranks, alphas and scales (sets over layers), parameter count, dtype and whether it loads (with
`--model`, whether it fits that checkpoint's projections, after the `--key-map` renames). Exit
status 1 if any adapter fails.

Example:
    $ jaxlora inspect ~/.cache/jaxlora/demo/adapters --model ~/.cache/jaxlora/demo/llama
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._key_map import add_key_map_argument, key_map_of

__all__ = ["adapter_rows", "add_arguments", "format_table", "run"]

COLUMNS = ("adapter", "targets", "ranks", "alphas", "scaling", "params", "dtype", "loads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="a PEFT adapter directory")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a Llama checkpoint directory to check them against",
    )
    add_key_map_argument(parser)


def _values(values: Any) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in sorted(set(values)))


def adapter_rows(
    directory: Path, layer_shapes: Any = None, key_map: Callable[[str], str] | None = None
) -> list[dict[str, str]]:
    """One dict per adapter, keyed by `COLUMNS`; `loads` is "yes" or "NO: <reason>"."""
    import jaxlora
    from jaxlora.errors import JaxLoraError

    rows = []
    for name, path in jaxlora.io.find_adapters(directory).items():
        row = dict.fromkeys(COLUMNS, "-") | {"adapter": name}
        rows.append(row)
        try:  # keyed by PEFT module path, which the config's patterns resolve against
            adapter, cfg = jaxlora.io.load_peft_adapter(path, name=name)
        except (JaxLoraError, OSError, ValueError) as err:
            row["loads"] = f"NO: {err}"
            continue
        row["targets"] = _values(p.rsplit(".", 1)[-1] for p in adapter)
        row["ranks"] = _values(w.rank for w in adapter.values())
        row["alphas"] = _values(cfg.alpha_for(p) for p in adapter)
        row["scaling"] = _values(round(float(w.scale), 6) for w in adapter.values())
        row["params"] = str(sum(int(w.a.size + w.b.size) for w in adapter.values()))
        row["dtype"] = _values(str(w.a.dtype) for w in adapter.values())
        row["loads"] = "yes" + (f" ({len(adapter)} layers)" if adapter else "")
        if layer_shapes is not None:  # the fit, under the renamed paths
            try:
                jaxlora.io.load_peft_adapter(
                    path, key_map=key_map, layer_shapes=layer_shapes, name=name
                )
            except (JaxLoraError, OSError, ValueError) as err:
                row["loads"] = f"NO: {err}"
    return rows


def format_table(rows: list[dict[str, str]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Left-aligned columns, a header and one line per row."""
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(r[c].ljust(w) for c, w in zip(columns, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    from jaxlora.errors import JaxLoraError

    layer_shapes = None
    try:
        if args.model is not None:
            from jaxlora.models import read_config

            layer_shapes = read_config(args.model).linear_shapes()
        rows = adapter_rows(args.directory, layer_shapes, key_map_of(args))
    except JaxLoraError as err:
        print(f"jaxlora inspect: error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows))
    return 0 if all(r["loads"].startswith("yes") for r in rows) else 1
