"""Find and replace dense kernels by dotted layer path in a model's parameter tree.

Supported trees: `jaxlora.DenseChain`, and nested mappings/lists as Flax Linen produces them
(`{"layers_0": {"attn": {"q": {"kernel": ..., "bias": ...}}}}`, path `layers_0.attn.q`).
Everything is functional: `with_kernels` returns a new tree and shares unchanged leaves.

Example:
    >>> import jax.numpy as jnp
    >>> tree = {"blocks": [{"q": {"kernel": jnp.zeros((2, 2))}}]}
    >>> kernel_paths(tree)
    ['blocks.0.q']
    >>> new = with_kernels(tree, {"blocks.0.q": jnp.ones((2, 2))})
    >>> float(new["blocks"][0]["q"]["kernel"][0, 0]), float(tree["blocks"][0]["q"]["kernel"][0, 0])
    (1.0, 0.0)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from .chain import DenseChain
from .errors import TargetNotFoundError, format_names

__all__ = ["get_kernel", "kernel_paths", "with_kernels"]


def kernel_paths(params: Any) -> list[str]:
    """Every dotted path of a layer that holds a `kernel` in `params`."""
    if isinstance(params, DenseChain):
        return list(params.paths)
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping):
            if "kernel" in node:
                found.append(prefix)
            items = node.items()
        elif isinstance(node, list | tuple):
            items = ((str(i), v) for i, v in enumerate(node))
        else:
            return
        for key, child in items:
            if key != "kernel":
                walk(child, f"{prefix}.{key}" if prefix else str(key))

    walk(params, "")
    return found


def _missing(params: Any, path: str) -> TargetNotFoundError:
    return TargetNotFoundError(
        f"the model has no dense layer at path {path!r}. Layers with a kernel: "
        f"{format_names(kernel_paths(params))}."
    )


def get_kernel(params: Any, path: str) -> jax.Array:
    """The kernel of the layer at `path`."""
    if isinstance(params, DenseChain):
        if path not in params.paths:
            raise _missing(params, path)
        return params.kernels[params.paths.index(path)]
    node = params
    for part in path.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _missing(params, path)
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise _missing(params, path)
    return node["kernel"]


def with_kernels(params: Any, kernels: Mapping[str, jax.Array]) -> Any:
    """A new tree with the kernels at `kernels`' paths replaced; the input is not modified."""
    for path in kernels:
        get_kernel(params, path)  # validate every path before building anything
    if isinstance(params, DenseChain):
        return params.replace_kernels(kernels)

    def rebuild(node: Any, prefix: str) -> Any:
        if isinstance(node, Mapping):
            out = {}
            for key, child in node.items():
                if key == "kernel" and prefix in kernels:
                    out[key] = kernels[prefix]
                else:
                    out[key] = rebuild(child, f"{prefix}.{key}" if prefix else str(key))
            return out
        if isinstance(node, list | tuple):
            items = [rebuild(c, f"{prefix}.{i}" if prefix else str(i)) for i, c in enumerate(node)]
            return type(node)(items)
        return node

    return rebuild(params, "")
