"""LoRA adapters on an unmodified Flax NNX model, by attribute path (spec SW-FLAX-1..4).

`with_lora(model, lora=...)` returns a *copy* of the model (`nnx.split` + `nnx.merge`; arrays
are shared, not copied) in which each targeted `nnx.Linear` / `nnx.LinearGeneral` is replaced by
a thin callable that runs the original layer and adds the LoRA delta. The caller's model is
never modified, and no global state is involved, so concurrent forwards with different adapters
cannot interfere. Paths are NNX attribute paths joined by dots (`"blocks.0.attn.query"`), as
`nnx.iter_modules` yields them. `apply` is `with_lora(...)(*args)`; under `jax.jit` pass the
adapters as arguments:

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x, sel: apply(nnx.merge(graphdef, state), x, lora=sel))

Supported: `nnx.Linear`; `nnx.LinearGeneral` contracting the input's trailing axes in order,
without `batch_axis`. A layer shared under several attribute paths is adapted under the path
`nnx.iter_modules` reports. State (batch statistics, RNG counters) behaves as in a plain call
of the model: `apply` writes the call's updates back to `model` (SW-FLAX-5); the copy that
`with_lora` returns shares the model's variables.

Example:
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> from flax import nnx
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
    >>> layer_shapes(model)
    {'layers.0': (4, 8), 'layers.1': (8, 2)}
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["1"], init_lora_weights=False)
    >>> bank = jaxlora.AdapterBank().add(
    ...     "a", jaxlora.init_adapter(jax.random.key(1), cfg, layer_shapes(model)))
    >>> apply(model, jnp.ones((3, 4)), lora=jaxlora.select(bank, "a")).shape
    (3, 2)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ..lora import as_selection, check_targets
from ..types import Active, LoraSelection, Routed, Routing
from ._targets import DenseSpec, add_lora, trailing_axes

__all__ = ["apply", "dense_layers", "layer_shapes", "with_lora"]

Array = jax.Array


def _spec(path: str, module: nnx.Linear | nnx.LinearGeneral, ndim: int | None = None) -> DenseSpec:
    if isinstance(module, nnx.Linear):
        return DenseSpec(path, "Linear", (int(module.in_features),), (int(module.out_features),))
    in_shape = tuple(int(f) for f in module.in_features)
    out_shape = tuple(int(f) for f in module.out_features)
    reason = None
    if module.batch_axis:
        reason = f"batch_axis={dict(module.batch_axis)} is not supported"
    elif ndim is not None and not trailing_axes(module.axis, ndim):
        reason = (
            f"axis={module.axis} does not contract the input's trailing axes in order (input "
            f"ndim {ndim}); only axis=-1, (-2, -1), ... are supported"
        )
    return DenseSpec(path, "LinearGeneral", in_shape, out_shape, reason)


def _linear_modules(
    model: nnx.Module,
) -> dict[str, tuple[tuple, nnx.Linear | nnx.LinearGeneral]]:
    found = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear | nnx.LinearGeneral):
            found[".".join(str(p) for p in path)] = (tuple(path), module)
    return found


def dense_layers(model: nnx.Module) -> dict[str, DenseSpec]:
    """Every Linear/LinearGeneral of the model, by dotted attribute path."""
    return {p: _spec(p, m) for p, (_, m) in _linear_modules(model).items()}


def layer_shapes(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """`path -> (in, out)` of the layers jaxlora can adapt: `jaxlora.init_adapter`'s argument."""
    return {p: s.features for p, s in dense_layers(model).items() if not s.unsupported}


class _LoraLayer:
    """Calls the original layer and adds the delta; other attributes read through to it."""

    def __init__(
        self,
        base: nnx.Linear | nnx.LinearGeneral,
        path: str,
        lora: Active | Routed,
        routing: Routing,
    ):
        self._base, self._path, self._lora = base, path, lora
        self._routing: Routing = routing

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Array:
        y = self._base(x, *args, **kwargs)
        return add_lora(_spec(self._path, self._base, x.ndim), x, y, self._lora, self._routing)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def _set(root: nnx.Module, path: tuple, value: Any) -> None:
    parent: Any = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _patched(
    clone: nnx.Module, lora: Active | Routed | None, routing: Routing
) -> tuple[Any, list[tuple[tuple, nnx.Module]]]:
    """`clone` with its targeted layers wrapped, and the `(path, module)` pairs it replaced."""
    if lora is None:
        return clone, []
    layers = _linear_modules(clone)
    check_targets(lora.paths(), layers, "the LoRA selection")
    replaced = []
    for name, (path, module) in layers.items():
        if name in lora.paths():
            if not path:  # the model itself is the targeted layer
                return _LoraLayer(module, name, lora, routing), []
            _set(clone, path, _LoraLayer(module, name, lora, routing))
            replaced.append((path, module))
    return clone, replaced


def with_lora(
    model: nnx.Module, lora: LoraSelection = None, *, routing: Routing = "auto"
) -> nnx.Module:
    """A copy of `model` whose targeted linear layers add LoRA deltas (SW-FLAX-1, SW-FLAX-4).

    Arguments:
        model: the unmodified NNX model (its structure is not changed).
        lora: `jaxlora.select(bank, names)`, one adapter, `stacked.route(names)` (row `i` uses
            its own adapter) or None.
        routing: the mixed-batch kernel (`jaxlora.routing.ROUTINGS`).
    """
    return _patched(nnx.merge(*nnx.split(model)), as_selection(lora), routing)[0]


def apply(
    model: nnx.Module,
    *args: Any,
    lora: LoraSelection = None,
    routing: Routing = "auto",
    **kwargs: Any,
) -> Any:
    """`model(*args, **kwargs)` with the LoRA selection added (SW-FLAX-1, SW-FLAX-4).

    State updates the call makes (BatchNorm statistics, RNG counters, ...) are written back to
    `model`, exactly as `model(*args)` would; the LoRA selection never becomes part of the
    model's state or structure (SW-FLAX-5).
    """
    clone = nnx.merge(*nnx.split(model))
    patched, replaced = _patched(clone, as_selection(lora), routing)
    out = patched(*args, **kwargs)
    for path, module in replaced:  # restore the clone's own layers, then copy its state back
        _set(clone, path, module)
    nnx.update(model, nnx.state(clone))
    return out
