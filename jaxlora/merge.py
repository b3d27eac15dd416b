"""Merge adapters into kernels, undo a merge, and combine adapters into one.

`merge` is functional (spec SW-MERGE-1, SW-MERGE-2): it returns new parameters and leaves the
original untouched, so going back is exact: keep the original. `unmerge` subtracts the delta
for callers who only hold merged weights (SW-MERGE-3; not bitwise). Both take any model form
`jaxlora.params` looks kernels up in (SW-MERGE-5): a `DenseChain`, an NNX module (a new module
comes back: merging into jaxlora's Llama gives a Llama), an `nnx.State`, Linen params or
variables, any nested tree. A kernel `[in..., out...]` (DenseGeneral, LinearGeneral) is adapted
as the 2-D layer `[prod(in), prod(out)]`, as the forward does (SW-MERGE-6). `key_map` maps
adapter paths to the model's (SW-MERGE-7). `combine` builds a new adapter from several, as
PEFT's `add_weighted_adapter` does (SW-COMBINE-1..4).

Example:
    >>> import jax.numpy as jnp, jaxlora
    >>> params = {"layers_0": {"kernel": jnp.zeros((2, 2, 3))}}  # a DenseGeneral: in (2, 2)
    >>> w = jaxlora.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), jnp.asarray(0.5))
    >>> merged = merge(params, {"mlp.fc": w}, key_map=lambda p: "layers_0")
    >>> merged["layers_0"]["kernel"][1, 1].tolist(), params["layers_0"]["kernel"][1, 1].tolist()
    ([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, TypeGuard

import jax.numpy as jnp
from jax.core import Tracer

from .bank import AdapterBank
from .errors import ConfigError, NonFiniteError, ShapeMismatchError, format_names
from .lora import check_targets, check_weights
from .params import find_kernels, with_kernels
from .types import Active, Adapter, LoraWeights, Routed, StackedBank

__all__ = ["COMBINE_METHODS", "combine", "merge", "unmerge"]

#: How `combine` builds the new adapter (see its docstring).
CombineMethod: TypeAlias = Literal["cat", "linear", "svd"]
COMBINE_METHODS: tuple[CombineMethod, ...] = ("cat", "linear", "svd")

#: What `merge` / `unmerge` take as adapters.
Adapters = Adapter | Sequence[Adapter] | Mapping[str, Adapter] | Active

#: `(label for messages, adapter, gate)`: gate None (always on), a bool or a traced bool.
_Entry = tuple[str, Adapter, Any]


def _is_adapter(value: Any) -> TypeGuard[Adapter]:
    return isinstance(value, Mapping) and all(isinstance(w, LoraWeights) for w in value.values())


def _entries(adapters: Adapters) -> list[_Entry]:
    """The adapters to merge, each with a label for messages and its gate."""
    if isinstance(adapters, Active):
        return [
            (f"adapter #{i}", ad, g)
            for i, (ad, g) in enumerate(zip(adapters.adapters, adapters.gate, strict=True))
        ]
    if isinstance(adapters, Routed | StackedBank):
        raise ConfigError(
            f"merge takes adapters applied to every row, not a {type(adapters).__name__} (a "
            "mixed batch has one adapter per row). Merge one adapter: merge(params, bank[name])."
        )
    if isinstance(adapters, Mapping):
        if _is_adapter(adapters):
            return [("the adapter", adapters, None)]
        values = list(adapters.values())
        named = [(f"adapter {n!r}", v, None) for n, v in adapters.items() if _is_adapter(v)]
        if len(named) == len(values):  # a bank or `name -> adapter` dict
            return named
        raise ConfigError(
            "expected an adapter (`layer path -> LoraWeights`), a sequence of adapters or a "
            f"mapping `name -> adapter`; got a mapping with values of types "
            f"{sorted({type(v).__name__ for v in values})}."
        )
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise ConfigError(
            f"expected an adapter (`layer path -> LoraWeights`), a sequence of adapters, a "
            f"mapping `name -> adapter` or jaxlora.select(...); got {adapters!r}. To merge by "
            "name: merge(params, bank[name])."
        )
    for i, ad in enumerate(adapters):
        if not _is_adapter(ad):
            raise ConfigError(
                f"adapter #{i}: expected a mapping `layer path -> LoraWeights`, got "
                f"{type(ad).__name__}."
            )
    return [(f"adapter #{i}", ad, None) for i, ad in enumerate(adapters)]


def _mapped(label: str, adapter: Adapter, key_map: Callable[[str], str] | None) -> dict:
    """`model path -> (adapter path, weights)` through `key_map` (SW-MERGE-7)."""
    out: dict[str, tuple[str, LoraWeights]] = {}
    for path, w in adapter.items():
        target = path if key_map is None else key_map(path)
        if not isinstance(target, str):
            raise ConfigError(
                f"{label}: key_map returned {target!r} for layer {path!r}; it must return the "
                "model's layer path (a str), e.g. key_map=lambda p: p.removeprefix('model.')."
            )
        if target in out:
            raise ConfigError(
                f"{label}: key_map maps layers {out[target][0]!r} and {path!r} to the same "
                f"model path {target!r}; it must map each layer to its own path."
            )
        out[target] = (path, w)
    return out


def _fit(kernel_shape: tuple[int, ...], w: LoraWeights, where: str) -> None:
    """The adapter's `(in, out)` must be a split `[prod(in), prod(out)]` of the kernel."""
    splits = [
        (math.prod(kernel_shape[:k]), math.prod(kernel_shape[k:]))
        for k in range(1, len(kernel_shape))
    ]
    if (w.in_features, w.out_features) in splits:
        return
    if not splits:
        layer = f"the kernel is {kernel_shape}, not a linear layer's [in..., out...]"
    elif len(kernel_shape) == 2:
        layer = f"the kernel is {kernel_shape}"
    else:
        views = " or ".join(str(s) for s in dict.fromkeys(splits))
        layer = f"the kernel is {kernel_shape} [in..., out...], a layer {views} (in, out)"
    raise ShapeMismatchError(
        f"{where}: {layer}, but the adapter maps ({w.in_features}, {w.out_features}) "
        f"(a{tuple(w.a.shape)}, b{tuple(w.b.shape)}). Was it made for another model?"
    )


def _traced(*arrays: Any) -> bool:
    return any(isinstance(x, Tracer) for x in arrays)


def _deltas(
    kernels: Mapping[str, Any],
    entries: list[_Entry],
    key_map: Callable[[str], str] | None,
    safe: bool,
) -> dict[str, tuple]:
    """`path -> (kernel, summed delta in the promoted dtype, traced "any gate on" or None)`,
    the deltas kernel-shaped; everything is validated before anything is built."""
    out: dict[str, tuple] = {}
    for label, adapter, gate in entries:
        mapped = _mapped(label, adapter, key_map)
        what = label if key_map is None else f"{label} (paths after key_map)"
        check_targets(set(mapped), kernels, what)
        for target, (path, w) in mapped.items():
            where = f"{label}, layer {path!r}" + (
                f" (model path {target!r})" if target != path else ""
            )
            check_weights(w, where=where)
            kernel = jnp.asarray(kernels[target])  # canonical dtype (x64 off)
            _fit(tuple(kernel.shape), w, where)
            if gate is not None and not _traced(gate) and not bool(gate):
                continue  # gated off: contributes nothing (SW-MERGE-9)
            dtype = jnp.result_type(kernel.dtype, w.a.dtype)
            cast = LoraWeights(
                jnp.asarray(w.a, dtype), jnp.asarray(w.b, dtype), jnp.asarray(w.scale)
            )
            delta = cast.delta().reshape(kernel.shape)
            if gate is not None and _traced(gate):
                delta = jnp.where(gate, delta, jnp.zeros_like(delta))  # NaN-safe, unlike *
            if safe and _traced(delta):
                raise ConfigError(
                    f"merge(..., safe=True) needs concrete arrays to check every delta for "
                    f"NaN/Inf, but {where} is traced (under jax.jit, vmap or grad). Call merge "
                    "outside jit, or pass safe=False (check the adapters first with "
                    "jaxlora.check_finite)."
                )
            if safe and not bool(jnp.all(jnp.isfinite(delta))):
                raise NonFiniteError(
                    f"{where}: the delta scale * a @ b has NaN/Inf "
                    f"(scale={float(w.scale)}); nothing was merged. Check the adapter weights."
                )
            # a traced gate: where(on, merged, kernel) keeps a gated-off kernel bitwise
            on = gate if gate is not None and _traced(gate) else None
            if target in out:
                prev_kernel, prev, prev_on = out[target]
                dtype = jnp.result_type(prev.dtype, delta.dtype)
                on = None if on is None or prev_on is None else prev_on | on
                out[target] = (prev_kernel, prev.astype(dtype) + delta.astype(dtype), on)
            else:
                out[target] = (kernel, delta, on)
    return out


def _apply(params: Any, deltas: Mapping[str, tuple], sign: int) -> Any:
    """`params` with `cast_W(W + sign * delta)` at every path (sum in the promoted dtype)."""
    new = {}
    for path, (kernel, delta, on) in deltas.items():
        wide = kernel.astype(delta.dtype)
        value = (wide + delta if sign > 0 else wide - delta).astype(kernel.dtype)
        new[path] = value if on is None else jnp.where(on, value, kernel)
    return with_kernels(params, new)


def merge(
    params: Any,
    adapters: Adapters,
    *,
    key_map: Callable[[str], str] | None = None,
    safe: bool = False,
) -> Any:
    """New parameters with `kernel + scale * a @ b` at every targeted path (SW-MERGE-1).

    Arguments:
        params: any model form of `jaxlora.params`: a `DenseChain`, an NNX module (a new module
            of the same class comes back; jaxlora's Llama by its `lora_path`s), an `nnx.State`,
            Linen params or variables, a nested tree. A kernel `[in..., out...]` takes the
            delta reshaped from `[prod(in), prod(out)]` (SW-MERGE-6).
        adapters: one adapter, a sequence (deltas summed), a mapping `name -> adapter` (e.g. an
            `AdapterBank`; errors then name the adapter) or `jaxlora.select(bank, [...])`
            (adapters gated off contribute nothing, SW-MERGE-9).
        key_map: adapter layer path -> the model's layer path (default: the same path), as in
            `jaxlora.io.load_peft` (SW-MERGE-7).
        safe: refuse (`NonFiniteError`) before building anything if a delta has NaN/Inf
            (SW-MERGE-4). Needs concrete arrays: under `jit` it raises `ConfigError`
            (SW-MERGE-8).

    Returns:
        The merged model, of the kind given; `params` itself is unchanged (SW-MERGE-2).

    Example:
        >>> params = {"layers": [{"kernel": jnp.zeros((2, 3))}, {"kernel": jnp.zeros((3, 3))}]}
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 3)), jnp.asarray(2.0))
        >>> merge(params, {"layers.0": w})["layers"][0]["kernel"].tolist()
        [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
    """
    return _apply(params, _deltas(find_kernels(params), _entries(adapters), key_map, safe), 1)


def unmerge(params: Any, adapters: Adapters, *, key_map: Callable[[str], str] | None = None) -> Any:
    """New parameters with the delta subtracted again (SW-MERGE-3): equal to the original within
    the tolerance policy, not bitwise. To go back exactly, keep the unmerged model instead.

    Takes what `merge` takes (any model form, general kernels, `key_map`).

    Example:
        >>> params = {"q": {"kernel": jnp.ones((2, 2))}}
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> unmerge(merge(params, {"q": w}), {"q": w})["q"]["kernel"].tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    deltas = _deltas(find_kernels(params), _entries(adapters), key_map, safe=False)
    return _apply(params, deltas, -1)


def _combined_paths(adapters: Sequence[Adapter]) -> list[str]:
    paths: list[str] = []
    for adapter in adapters:
        paths.extend(p for p in adapter if p not in paths)
    return paths


def combine(
    bank: AdapterBank,
    names: Sequence[str],
    weights: Sequence[float],
    method: CombineMethod = "cat",
    *,
    svd_rank: int | None = None,
) -> dict[str, LoraWeights]:
    """One new adapter equal to a weighted combination of several (SW-COMBINE-1..4).

    Arguments:
        bank: holds the adapters.
        names, weights: the adapters and their weights `w_i` (same length).
        method: `"cat"` (exact: `sum_i w_i s_i A_i B_i`, rank = sum of ranks), `"linear"`
            (PEFT's: equal ranks, `A = sum sign(c_i) sqrt|c_i| A_i`, `B = sum sqrt|c_i| B_i`,
            `c_i = w_i s_i`) or `"svd"` (best rank-`svd_rank` approximation of the exact sum;
            default rank: the largest input rank at that layer).

    Returns:
        An adapter (`path -> LoraWeights`, scale 1) to `bank.add` under a new name.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(2.0))
        >>> bank = AdapterBank({"x": {"l0": w}, "y": {"l0": w}})
        >>> new = combine(bank, ["x", "y"], [1.0, 0.5], "cat")
        >>> new["l0"].delta().tolist()
        [[3.0, 3.0], [3.0, 3.0]]
    """
    if method not in COMBINE_METHODS:
        raise ConfigError(
            f"unknown combination method {method!r}; choose one of {COMBINE_METHODS}."
        )
    if len(names) != len(weights) or not names:
        raise ConfigError(
            f"`names` and `weights` must be non-empty and of one length; got {len(names)} names "
            f"and {len(weights)} weights."
        )
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"`svd_rank` must be a positive integer or None, got {svd_rank!r}.")
    adapters = [bank[n] for n in names]
    out: dict[str, LoraWeights] = {}
    one = jnp.asarray(1.0, jnp.float32)
    for path in _combined_paths(adapters):
        # (name, c_i = w_i * s_i, weights) for the adapters that target this layer
        parts = [
            (n, float(wt) * float(ad[path].scale), ad[path])
            for n, wt, ad in zip(names, weights, adapters, strict=True)
            if path in ad
        ]
        dtype = jnp.result_type(*(w.a.dtype for _, _, w in parts))
        if method == "cat":
            a = jnp.concatenate([c * w.a.astype(dtype) for _, c, w in parts], axis=1)
            b = jnp.concatenate([w.b.astype(dtype) for _, _, w in parts], axis=0)
        elif method == "linear":
            ranks = {n: w.rank for n, _, w in parts}
            if len(set(ranks.values())) > 1:
                raise ConfigError(
                    f"method='linear' needs equal ranks, but at layer {path!r} the ranks are "
                    f"{ranks}. Use method='cat' (exact) or 'svd'."
                )
            # Python floats are weakly typed: the factors keep the adapters' dtype
            a = functools.reduce(
                operator.add,
                [math.copysign(math.sqrt(abs(c)), c) * w.a.astype(dtype) for _, c, w in parts],
            )
            b = functools.reduce(
                operator.add, [math.sqrt(abs(c)) * w.b.astype(dtype) for _, c, w in parts]
            )
        else:
            wide = jnp.result_type(dtype, jnp.float32)  # SVD in at least float32
            delta = functools.reduce(
                operator.add, [c * (w.a.astype(wide) @ w.b.astype(wide)) for _, c, w in parts]
            )
            k = svd_rank if svd_rank is not None else max(w.rank for _, _, w in parts)
            k = min(k, *delta.shape)
            u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
            a = (u[:, :k] * s[:k]).astype(dtype)
            b = vt[:k].astype(dtype)
        out[path] = LoraWeights(a, b, one)
    if not out:
        raise ConfigError(f"adapters {format_names(names)} target no layer; nothing to combine.")
    return out
