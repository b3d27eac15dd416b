"""The `--key-map OLD=NEW` option of the commands that load adapters against a model.

An adapter saved for the same model under other module names (for instance from a bare
`LlamaModel`, paths `layers.0.self_attn.q_proj`) loads after its path prefixes are renamed:
`--key-map layers.=model.layers.`; an empty OLD adds a prefix to every path (`--key-map
=model.`). Repeatable; the longest matching OLD wins (`jaxlora.io.prefix_key_map`).

Example:
    >>> p = argparse.ArgumentParser(prog="x"); add_key_map_argument(p)
    >>> key_map_of(p.parse_args(["--key-map", "layers.=model.layers."]))("layers.0.mlp.up_proj")
    'model.layers.0.mlp.up_proj'
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_key_map_argument", "key_map_of"]


def _rename(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"expected OLD=NEW (a path prefix and its replacement, e.g. layers.=model.layers.), "
            f"got {text!r}"
        )
    return old, new


def add_key_map_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--key-map OLD=NEW` (repeatable) to `parser`."""
    parser.add_argument(
        "--key-map",
        type=_rename,
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename the adapters' module path prefix OLD to NEW before matching the model's "
        "layers (repeatable; e.g. layers.=model.layers.)",
    )


def key_map_of(args: argparse.Namespace) -> Callable[[str], str] | None:
    """The key map the `--key-map` options describe; None without any."""
    from jaxlora.io import prefix_key_map

    return prefix_key_map(dict(args.key_map)) if args.key_map else None
