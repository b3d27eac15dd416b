"""Find and replace the kernels of a model's linear layers by dotted layer path.

One lookup serves every model form `jaxlora.merge` takes (spec SW-MERGE-5):

- an object with `lora_kernels()` (`path -> kernel`) and `replace_kernels(kernels)` (a new
  object), the [`KernelHolder`][] protocol, such as `jaxlora.DenseChain`: the model names its
  own layers;
- a Flax NNX module: the dotted attribute path of each module holding a `kernel` variable, as
  `nnx.iter_modules` gives it (`layers.0`, `blocks.0.attn.query`, like
  `jaxlora.flax.nnx.layer_shapes`), except that a module with a string attribute `lora_path`
  (jaxlora's Llama projections: `model.layers.0.self_attn.q_proj`) is named by it instead;
  a new module is returned (`nnx.split`, new state, `nnx.merge`), with its own variables;
- any other pytree (an `nnx.State`, Linen params, nested dicts / lists / tuples / dataclasses):
  every leaf under the key `kernel` (an NNX variable's value included) is the kernel of the
  layer at the path of its parent, integer keys written as digits (`blocks.0.q`). Linen
  `variables` (a mapping with a `params` collection) are looked up inside `params`
  (`layers_0`, as `jaxlora.flax.linen.layer_shapes` names it); the other collections are kept.

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

import dataclasses
import sys
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


def _key(entry: Any) -> str:
    """A pytree key path entry as a path part: dict key, sequence index or attribute name."""
    for field in ("key", "idx", "name"):
        if hasattr(entry, field):
            return str(getattr(entry, field))
    return str(entry)


def _is_linen_variables(tree: Any) -> bool:
    return (
        isinstance(tree, Mapping)
        and "kernel" not in tree
        and isinstance(tree.get("params"), Mapping)
    )


def _tree_view(tree: Any, names: Mapping[str, str] | None = None) -> _View:
    """Kernels of a pytree: leaves keyed `kernel` (NNX: `kernel.value`); `names` renames."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    skip = 1 if _is_linen_variables(tree) else 0  # the `params` collection of Linen variables
    index: dict[str, int] = {}
    for i, (key_path, _) in enumerate(flat):
        keys = [_key(k) for k in key_path]
        if (
            len(keys) > 1
            and keys[-1] == "value"
            and isinstance(key_path[-1], jax.tree_util.GetAttrKey)
        ):
            keys.pop()  # an NNX variable (or a Linen box) holding the array
        if not keys or keys[-1] != "kernel" or (skip and keys[0] != "params"):
            continue
        path = ".".join(keys[skip:-1])
        path = (names or {}).get(path, path)
        if path in index:
            raise ConfigError(
                f"two kernels of the parameter tree have the path {path!r} (a key containing "
                "'.' or a `lora_path` that repeats another layer's path); rename one of them."
            )
        index[path] = i
    leaves = [leaf for _, leaf in flat]

    def build(new: Mapping[str, Any]) -> Any:
        out = list(leaves)
        for path, kernel in new.items():
            out[index[path]] = kernel
        return treedef.unflatten(out)

    return _View({p: leaves[i] for p, i in index.items()}, build)


def _nnx_view(model: Any, nnx: Any) -> _View:
    graphdef, state = nnx.split(model)
    names = {
        ".".join(str(p) for p in path): module.lora_path
        for path, module in nnx.iter_modules(model)
        if isinstance(getattr(module, "lora_path", None), str)
    }
    view = _tree_view(state, names)
    return _View(view.kernels, lambda new: nnx.merge(graphdef, view.build(new)))


def _view(params: Any) -> _View:
    if isinstance(params, KernelHolder):
        return _View(dict(params.lora_kernels()), params.replace_kernels)
    # only an imported flax.nnx can have made an NNX module: no import needed to test for one
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(params, nnx.Module):
        return _nnx_view(params, nnx)
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

    Every path and shape is checked before anything is built; the input is not modified.
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
    return view.build(kernels)
