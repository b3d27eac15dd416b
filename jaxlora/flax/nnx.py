"""LoRA adapters on an unmodified Flax NNX model, by attribute path (spec SW-FLAX-1..4).

`with_lora(model, active=...)` returns a *copy* of the model (`nnx.split` + `nnx.merge`; arrays
are shared, not copied) in which each targeted `nnx.Linear` / `nnx.LinearGeneral` is replaced by
a thin callable that runs the original layer and adds the LoRA delta. The caller's model is
never modified, and no global state is involved, so concurrent forwards with different adapters
cannot interfere. Paths are NNX attribute paths joined by dots (`"blocks.0.attn.query"`), as
`nnx.iter_modules` yields them. `apply` is `with_lora(...)(*args)`; under `jax.jit` pass the
adapters as arguments:

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x, act: apply(nnx.merge(graphdef, state), x, active=act))

Supported: `nnx.Linear`; `nnx.LinearGeneral` contracting the input's trailing axes in order,
without `batch_axis`. A layer shared under several attribute paths is adapted under the path
`nnx.iter_modules` reports. The copy is for inference: state updates made during the call
(batch statistics, RNG counters) are not written back to `model`.

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
    >>> apply(model, jnp.ones((3, 4)), active=jaxlora.select(bank, "a")).shape
    (3, 2)
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from ..bank import Active, StackedBank
from ._targets import DenseSpec, LoraRequest, add_lora, check_targets, trailing_axes

__all__ = ["apply", "apply_mixed", "dense_layers", "layer_shapes", "with_lora"]

Array = jax.Array


def _spec(path: str, module: nnx.Module, ndim: int | None = None) -> DenseSpec:
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


def _linear_modules(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Module]]:
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

    def __init__(self, base: nnx.Module, path: str, request: LoraRequest):
        self._base, self._path, self._request = base, path, request

    def __call__(self, x: Array, *args: Any, **kwargs: Any) -> Array:
        y = self._base(x, *args, **kwargs)
        return add_lora(_spec(self._path, self._base, x.ndim), x, y, self._request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def _set(root: nnx.Module, path: tuple, value: Any) -> None:
    parent = root
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    key = path[-1]
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _patched(model: nnx.Module, request: LoraRequest) -> nnx.Module:
    clone = nnx.merge(*nnx.split(model))
    layers = _linear_modules(clone)
    check_targets(request, {p: None for p in layers})
    targeted = request.paths()
    for name, (path, module) in layers.items():
        if name in targeted:
            if not path:  # the model itself is the targeted layer
                return _LoraLayer(module, name, request)
            _set(clone, path, _LoraLayer(module, name, request))
    return clone


def with_lora(
    model: nnx.Module,
    active: Active = (),
    *,
    stacked: StackedBank | None = None,
    ids: Array | None = None,
    routing: str = "auto",
) -> nnx.Module:
    """A copy of `model` whose targeted linear layers add LoRA deltas (SW-FLAX-1, SW-FLAX-4).

    Arguments:
        model: the unmodified NNX model (not changed).
        active: `jaxlora.select(bank, names)` for the whole batch; or
        stacked, ids: a stacked bank and one slot id per batch row (-1: none).
        routing: the mixed-batch kernel (`jaxlora.routing.METHODS`).
    """
    return _patched(model, LoraRequest.build(active, stacked, ids, routing))


def apply(model: nnx.Module, *args: Any, active: Active = (), **kwargs: Any) -> Any:
    """`model(*args, **kwargs)` with the active adapters added (SW-FLAX-1)."""
    return with_lora(model, active)(*args, **kwargs)


def apply_mixed(
    model: nnx.Module,
    *args: Any,
    stacked: StackedBank,
    ids: Array,
    routing: str = "auto",
    **kwargs: Any,
) -> Any:
    """`model(*args)` where batch row `i` uses slot `ids[i]` of `stacked` (-1: none) (SW-FLAX-4)."""
    return with_lora(model, stacked=stacked, ids=ids, routing=routing)(*args, **kwargs)
