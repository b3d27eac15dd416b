"""LoRA adapters on an unmodified Flax Linen model, by module path (spec SW-FLAX-1..4).

`apply` runs `model.apply` inside `flax.linen.intercept_methods` with an interceptor that, for
each `nn.Dense` / `nn.DenseGeneral` call whose module path (`"block_0.attn.query"`, the path of
its parameters in `variables["params"]`) an adapter targets, adds the LoRA delta to the output.
Nothing is stored or mutated: the adapters (or the stacked bank and per-row ids) are ordinary
arguments, so `jax.jit(lambda v, x, sel: apply(model, v, x, lora=sel))` compiles once per
structure and switching adapters retraces nothing. `lora=` takes every form the rest of jaxlora
takes (`jaxlora.select(...)`, one adapter, `stacked.route(names)`, None) and `routing=` names the
mixed-batch kernel; `method=` is Linen's own (the module method to apply).

Supported: `nn.Dense`; `nn.DenseGeneral` contracting the input's trailing axes in order
(`axis=-1` or `(-2, -1)`, ...) without `batch_dims`, adapted as a `[prod(in), prod(out)]`
layer. Other layers (`nn.Einsum`, `nn.Conv`, DenseGeneral with `batch_dims`) are not listed by
`layer_shapes`, and targeting one raises `UnsupportedFeatureError`. Layers inside `nn.scan` /
`nn.vmap` (stacked kernels) are not supported.

Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxlora
    >>> model = nn.Sequential([nn.Dense(8), nn.Dense(4)])
    >>> x = jnp.ones((2, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> shapes = layer_shapes(model, x)
    >>> shapes
    {'layers_0': (4, 8), 'layers_1': (8, 4)}
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["layers_1"], init_lora_weights=False)
    >>> bank = jaxlora.AdapterBank().add("a", jaxlora.init_adapter(jax.random.key(1), cfg, shapes))
    >>> apply(model, variables, x, lora=jaxlora.select(bank, "a")).shape
    (2, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from ..lora import as_selection, check_targets
from ..types import Active, LoraSelection, Routed, Routing
from ._targets import DenseSpec, add_lora, trailing_axes

__all__ = ["apply", "dense_layers", "interceptor", "layer_shapes"]

Array = jax.Array


def _spec(module: nn.Module, x: Array) -> DenseSpec:
    path = ".".join(str(p) for p in module.path)
    if isinstance(module, nn.Dense):
        return DenseSpec(path, "Dense", (int(x.shape[-1]),), (int(module.features),))
    features = module.features
    features = (features,) if isinstance(features, int) else tuple(features)
    axis = module.axis
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    in_shape = tuple(int(x.shape[a]) for a in axis)
    reason = None
    if module.batch_dims:
        reason = f"batch_dims={tuple(module.batch_dims)} is not supported"
    elif not trailing_axes(axis, x.ndim):
        reason = (
            f"axis={module.axis} does not contract the input's trailing axes in order "
            f"(input ndim {x.ndim}); only axis=-1, (-2, -1), ... are supported"
        )
    return DenseSpec(path, "DenseGeneral", in_shape, tuple(int(f) for f in features), reason)


def interceptor(
    lora: Active | Routed | None,
    routing: Routing = "auto",
    seen: dict[str, DenseSpec] | None = None,
) -> Callable:
    """The `nn.intercept_methods` interceptor adding `lora`'s deltas to Dense outputs.

    Records every Dense/DenseGeneral call in `seen` (path -> `DenseSpec`) when given.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.DenseGeneral):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        spec = _spec(module, x)
        if seen is not None:
            seen[spec.path] = spec
        return add_lora(spec, x, y, lora, routing)

    return intercept


def dense_layers(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, DenseSpec]:
    """Every Dense/DenseGeneral the model calls on these inputs (shapes only, no FLOPs).

    `args`/`kwargs` are what `model.init(key, *args, **kwargs)` takes (arrays or
    `jax.ShapeDtypeStruct`s).
    """
    seen: dict[str, DenseSpec] = {}
    with nn.intercept_methods(interceptor(None, seen=seen)):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return seen


def layer_shapes(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[int, int]]:
    """`path -> (in, out)` of the layers jaxlora can adapt: `jaxlora.init_adapter`'s argument.

    Paths are in call order; `LoraConfig(target_modules=...)` selects among them (SW-FLAX-3).
    """
    return {
        p: s.features for p, s in dense_layers(model, *args, **kwargs).items() if not s.unsupported
    }


def apply(
    model: nn.Module,
    variables: Any,
    *args: Any,
    lora: LoraSelection = None,
    routing: Routing = "auto",
    method: Any = None,
    **kwargs: Any,
) -> Any:
    """`model.apply(variables, *args, **kwargs)` with the LoRA selection added (SW-FLAX-1, -4).

    Arguments:
        model, variables: the unmodified Linen model and its variables.
        lora: `jaxlora.select(bank, names)`, one adapter, `stacked.route(names)` (row `i` of
            every targeted layer's input uses its own adapter; the batch must be the leading
            axis) or None (exactly the base model).
        routing: the mixed-batch kernel (`jaxlora.routing.ROUTINGS`).
        method: forwarded to `model.apply`.
    """
    sel = as_selection(lora)
    seen: dict[str, DenseSpec] = {}
    with nn.intercept_methods(interceptor(sel, routing, seen)):
        out = model.apply(variables, *args, method=method, **kwargs)
    if sel is not None:
        check_targets(sel.paths(), seen, "the LoRA selection")
    return out
