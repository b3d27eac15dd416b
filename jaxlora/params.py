"""Find and replace the kernels of a model's linear layers by dotted layer path.

One lookup serves every model form `jaxlora.merge` takes (spec SW-MERGE-5), without knowing any
framework: it walks JAX pytrees.

- An object with `lora_kernels()` (`path -> kernel`) and `replace_kernels(kernels)` (a new
  object), the [`KernelHolder`][] protocol (e.g. `jaxlora.DenseChain`), names its own layers.
- In any other pytree (Flax NNX modules, which are pytrees, an `nnx.State`, Linen params,
  nested dicts / lists / tuples / dataclasses) every leaf under the key `kernel` (an NNX
  variable's value included) is the kernel of the layer at the dotted path of its parent,
  integer keys written as digits: `layers.0`, `blocks.0.attn.query`, the attribute paths
  `jaxlora.flax.nnx.layer_shapes` reports.
- A node with a string attribute `lora_path` (jaxlora's Llama projections) declares the path of
  its own `kernel` (`model.layers.0.self_attn.q_proj`); its attribute path is not used.
- Linen `variables` (a mapping with a `params` collection) are looked up inside `params`
  (`layers_0`, as `jaxlora.flax.linen.layer_shapes` names it); the other collections are kept.

Everything is functional: `with_kernels` rebuilds the tree (a new NNX module of the same class,
with its own variables) and shares unchanged arrays.

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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from .errors import ConfigError, ShapeMismatchError, TargetNotFoundError, format_names

__all__ = ["KernelHolder", "find_kernels", "get_kernel", "kernel_paths", "with_kernels"]

Array = jax.Array


@runtime_checkable
class KernelHolder(Protocol):
    """A model that names its own linear layers (e.g. `jaxlora.DenseChain`).

    `lora_kernels()` returns `path -> kernel [in..., out...]`; `replace_kernels(kernels)` returns
    a new model with the kernels at the given paths replaced (the others unchanged).
    """

    def lora_kernels(self) -> Mapping[str, Array]: ...

    def replace_kernels(self, kernels: Mapping[str, Array]) -> Any: ...


@dataclasses.dataclass(frozen=True)
class _View:
    """The kernels of a model by path, and how to build the model back with new ones."""

    kernels: dict[str, Any]
    build: Callable[[Mapping[str, Any]], Any]


def _declares_path(node: Any) -> bool:
    return isinstance(getattr(node, "lora_path", None), str)


def _keys(key_path: tuple) -> list[str]:
    """A pytree key path as path parts; the `.value` of an NNX variable (or Linen box) dropped."""
    keys = [
        str(next((getattr(k, f) for f in ("key", "idx", "name") if hasattr(k, f)), k))
        for k in key_path
    ]
    if len(keys) > 1 and keys[-1] == "value" and isinstance(key_path[-1], jax.tree_util.GetAttrKey):
        keys.pop()
    return keys


def _is_linen_variables(tree: Any) -> bool:
    """Linen `variables`: a dict (or Flax's FrozenDict; not an `nnx.State`, whose keys are
    attribute names) with a `params` collection."""
    return (
        (isinstance(tree, dict) or type(tree).__name__ == "FrozenDict")
        and "kernel" not in tree
        and isinstance(tree.get("params"), Mapping)
    )


def _own_kernel(node: Any) -> tuple[int, list, Any] | None:
    """`(index of its `kernel` leaf, leaves, treedef)` of a node that declares `lora_path`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(node)
    for j, (key_path, _) in enumerate(flat):
        if _keys(key_path) == ["kernel"]:
            return j, [leaf for _, leaf in flat], treedef
    return None


def _tree_view(tree: Any) -> _View:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_declares_path)
    if len(flat) == 1 and flat[0][1] is tree and not hasattr(tree, "shape"):
        raise ConfigError(
            f"a {type(tree).__name__} is not a parameter tree (not a JAX pytree, and no "
            "lora_kernels() / replace_kernels()). Give its parameters as a pytree; for an NNX "
            "module with pytree=False: graphdef, state = nnx.split(model), merge the state, "
            "then nnx.merge(graphdef, merged_state)."
        )
    skip = int(_is_linen_variables(tree))  # paths inside the `params` collection
    leaves = [leaf for _, leaf in flat]
    where: dict[str, tuple[int, Any]] = {}  # path -> (leaf index, the node's own kernel or None)
    kernels: dict[str, Any] = {}
    for i, (key_path, leaf) in enumerate(flat):
        if _declares_path(leaf):
            own = _own_kernel(leaf)
            if own is None:
                continue
            path, kernel = leaf.lora_path, own[1][own[0]]
        else:
            keys = _keys(key_path)
            if not keys or keys[-1] != "kernel" or (skip and keys[0] != "params"):
                continue
            path, kernel, own = ".".join(keys[skip:-1]), leaf, None
        if path in kernels:
            raise ConfigError(
                f"two kernels of the parameter tree have the path {path!r} (a key containing "
                "'.', or a `lora_path` that repeats another layer's path); rename one of them."
            )
        where[path], kernels[path] = (i, own), kernel

    def build(new: Mapping[str, Any]) -> Any:
        out = list(leaves)
        for path, kernel in new.items():
            i, own = where[path]
            if own is None:
                out[i] = kernel
            else:
                j, inner, inner_def = own
                out[i] = inner_def.unflatten([kernel if k == j else x for k, x in enumerate(inner)])
        return treedef.unflatten(out)

    return _View(kernels, build)


def _view(params: Any) -> _View:
    if isinstance(params, KernelHolder):
        return _View(dict(params.lora_kernels()), params.replace_kernels)
    return _tree_view(params)


def _missing(view: _View, path: str) -> TargetNotFoundError:
    return TargetNotFoundError(
        f"the model has no layer with a kernel at path {path!r}. Layers with a kernel: "
        f"{format_names(view.kernels)}."
    )


def find_kernels(params: Any) -> dict[str, Array]:
    """`path -> kernel` of every layer the lookup accepts, in tree order.

    Example:
        >>> import numpy as np
        >>> {p: k.shape for p, k in find_kernels({"q": {"kernel": np.zeros((2, 3))}}).items()}
        {'q': (2, 3)}
    """
    return dict(_view(params).kernels)


def kernel_paths(params: Any) -> list[str]:
    """Every path the lookup accepts: the dotted path of each layer that holds a kernel."""
    return list(_view(params).kernels)


def get_kernel(params: Any, path: str) -> Array:
    """The kernel of the layer at `path`; `TargetNotFoundError` lists the accepted paths."""
    view = _view(params)
    if path not in view.kernels:
        raise _missing(view, path)
    return view.kernels[path]


def with_kernels(params: Any, kernels: Mapping[str, Array]) -> Any:
    """A new model of the same kind with the kernels at `kernels`' paths replaced.

    Every path and shape is checked before anything is built; the input is not modified. A
    kernel that is the very same array at two paths (an NNX module reachable under two
    attribute paths) must be replaced at both or neither: a pytree cannot keep them shared.
    """
    view = _view(params)
    for path, kernel in kernels.items():
        if path not in view.kernels:
            raise _missing(view, path)
        old, new = np.shape(view.kernels[path]), np.shape(kernel)
        if old != new:
            raise ShapeMismatchError(
                f"layer {path!r}: the new kernel is {new} but the model's is {old}; a "
                "replacement keeps the shape."
            )
        for other, array in view.kernels.items():
            if array is view.kernels[path] and other != path and kernels.get(other) is not kernel:
                raise ConfigError(
                    f"layers {path!r} and {other!r} share one kernel (one module under two "
                    "paths); changing one would untie them. Change both the same way, or merge "
                    "into the NNX state, which keeps the sharing: graphdef, state = "
                    "nnx.split(model); nnx.merge(graphdef, jaxlora.merge(state, adapter))."
                )
    return view.build(kernels)
