"""Merge adapters into kernels, undo a merge, and combine adapters into one.

`merge` is functional (spec SW-MERGE-1, SW-MERGE-2): it returns new parameters and leaves the
original untouched, so going back is exact: keep the original. `unmerge` subtracts the delta
for callers who only hold merged weights (SW-MERGE-3; not bitwise). `combine` builds a new
adapter from several, as PEFT's `add_weighted_adapter` does (SW-COMBINE-1..4).

Example:
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> model = jaxlora.DenseChain.init(jax.random.key(0), ["l0", "l1"], [4, 4, 2])
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["l0"], init_lora_weights=False)
    >>> ad = jaxlora.init_adapter(jax.random.key(1), cfg, model.layer_shapes())
    >>> merged = jaxlora.merge(model, ad)
    >>> x = jnp.ones((1, 4))
    >>> bool(jnp.allclose(jaxlora.forward(merged, x), jaxlora.forward(model, x, (ad,)), atol=1e-6))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from .bank import AdapterBank
from .errors import ConfigError, NonFiniteError, ShapeMismatchError, format_names
from .params import get_kernel, with_kernels
from .weights import Adapter, LoraWeights

__all__ = ["COMBINE_METHODS", "combine", "merge", "unmerge"]

COMBINE_METHODS = ("cat", "linear", "svd")


def _labelled(adapters: Adapter | Sequence[Adapter] | Mapping[str, Adapter]) -> list[tuple]:
    """`[(label for messages, adapter)]` from one adapter, a sequence, or `name -> adapter`."""
    if isinstance(adapters, Mapping):
        values = list(adapters.values())
        if values and all(isinstance(v, LoraWeights) for v in values):
            return [("the adapter", adapters)]
        if all(isinstance(v, Mapping) for v in values):  # a bank or `name -> adapter` dict
            return [(f"adapter {n!r}", adapters[n]) for n in adapters]
        raise ConfigError(
            "expected an adapter (`layer path -> LoraWeights`), a sequence of adapters or a "
            f"mapping `name -> adapter`; got a mapping with values of types "
            f"{sorted({type(v).__name__ for v in values})}."
        )
    if isinstance(adapters, str) or not isinstance(adapters, Sequence):
        raise ConfigError(
            f"expected an adapter (`layer path -> LoraWeights`), a sequence of adapters or a "
            f"mapping `name -> adapter`; got {adapters!r}. To merge by name: "
            "merge(params, bank[name])."
        )
    for i, ad in enumerate(adapters):
        if not isinstance(ad, Mapping) or not all(isinstance(w, LoraWeights) for w in ad.values()):
            raise ConfigError(
                f"adapter #{i}: expected a mapping `layer path -> LoraWeights`, got "
                f"{type(ad).__name__}."
            )
    return [(f"adapter #{i}", ad) for i, ad in enumerate(adapters)]


def _deltas(params: Any, adapters: Sequence[tuple], safe: bool) -> dict[str, tuple]:
    """`path -> (kernel, delta in the promoted dtype)`, validated before anything is built."""
    out: dict[str, tuple] = {}
    for label, adapter in adapters:
        for path, w in adapter.items():
            kernel = jnp.asarray(get_kernel(params, path))  # canonical dtype (x64 off)
            if tuple(kernel.shape) != (w.in_features, w.out_features):
                raise ShapeMismatchError(
                    f"{label}, layer {path!r}: the kernel is {tuple(kernel.shape)} but the "
                    f"adapter maps ({w.in_features}, {w.out_features}) (a{tuple(w.a.shape)}, "
                    f"b{tuple(w.b.shape)}). Was it made for another model?"
                )
            dtype = jnp.result_type(kernel.dtype, w.a.dtype)
            delta = (jnp.asarray(w.a, dtype) @ jnp.asarray(w.b, dtype)) * jnp.asarray(
                w.scale
            ).astype(dtype)
            if safe and not bool(jnp.all(jnp.isfinite(delta))):
                raise NonFiniteError(
                    f"{label}, layer {path!r}: the delta scale * a @ b has NaN/Inf "
                    f"(scale={float(w.scale)}); nothing was merged. Check the adapter weights."
                )
            if path in out:
                prev_kernel, prev = out[path]
                dtype = jnp.result_type(prev.dtype, delta.dtype)
                out[path] = (prev_kernel, prev.astype(dtype) + delta.astype(dtype))
            else:
                out[path] = (kernel, delta)
    return out


def merge(
    params: Any,
    adapters: Adapter | Sequence[Adapter] | Mapping[str, Adapter],
    *,
    safe: bool = False,
) -> Any:
    """New parameters with `kernel + scale * a @ b` at every targeted path (SW-MERGE-1).

    Arguments:
        params: a `DenseChain` or a nested parameter tree (see `jaxlora.params`).
        adapters: one adapter, a sequence (e.g. `select(bank, [...])`; deltas summed), or a
            mapping `name -> adapter` (e.g. an `AdapterBank`; errors then name the adapter).
        safe: refuse (`NonFiniteError`) before building anything if a delta has NaN/Inf. Needs
            concrete arrays (not under `jit`).

    Returns:
        The merged tree; `params` itself is unchanged (SW-MERGE-2).
    """
    deltas = _deltas(params, _labelled(adapters), safe)
    return with_kernels(
        params,
        {p: (k.astype(d.dtype) + d).astype(k.dtype) for p, (k, d) in deltas.items()},
    )


def unmerge(params: Any, adapters: Adapter | Sequence[Adapter] | Mapping[str, Adapter]) -> Any:
    """New parameters with the delta subtracted again (SW-MERGE-3): equal to the original within
    the tolerance policy, not bitwise. To go back exactly, keep the unmerged tree instead."""
    deltas = _deltas(params, _labelled(adapters), safe=False)
    return with_kernels(
        params,
        {p: (k.astype(d.dtype) - d).astype(k.dtype) for p, (k, d) in deltas.items()},
    )


def _combined_paths(adapters: Sequence[Adapter]) -> list[str]:
    paths: list[str] = []
    for adapter in adapters:
        paths.extend(p for p in adapter if p not in paths)
    return paths


def combine(
    bank: AdapterBank,
    names: Sequence[str],
    weights: Sequence[float],
    method: str = "cat",
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
            a = sum(math.copysign(math.sqrt(abs(c)), c) * w.a.astype(dtype) for _, c, w in parts)
            b = sum(math.sqrt(abs(c)) * w.b.astype(dtype) for _, c, w in parts)
        else:
            wide = jnp.result_type(dtype, jnp.float32)  # SVD in at least float32
            delta = sum(c * (w.a.astype(wide) @ w.b.astype(wide)) for _, c, w in parts)
            k = svd_rank if svd_rank is not None else max(w.rank for _, _, w in parts)
            k = min(k, *delta.shape)
            u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
            a = (u[:, :k] * s[:k]).astype(dtype)
            b = vt[:k].astype(dtype)
        out[path] = LoraWeights(a, b, one)
    if not out:
        raise ConfigError(f"adapters {format_names(names)} target no layer; nothing to combine.")
    return out
