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
import numpy as np

from .bank import AdapterBank
from .errors import ConfigError, NonFiniteError, ShapeMismatchError, format_names
from .params import get_kernel, with_kernels
from .weights import Adapter, LoraWeights

__all__ = ["COMBINE_METHODS", "combine", "merge", "unmerge"]

COMBINE_METHODS = ("cat", "linear", "svd")


def _as_adapters(adapters: Adapter | Sequence[Adapter]) -> list[Adapter]:
    if isinstance(adapters, Mapping):
        return [adapters]
    return list(adapters)


def _deltas(params: Any, adapters: Sequence[Adapter], safe: bool) -> dict[str, tuple]:
    """`path -> (kernel, delta in the promoted dtype)`, validated before anything is built."""
    out: dict[str, tuple] = {}
    for index, adapter in enumerate(adapters):
        for path, w in adapter.items():
            kernel = get_kernel(params, path)
            if tuple(kernel.shape) != (w.in_features, w.out_features):
                raise ShapeMismatchError(
                    f"layer {path!r}: the kernel is {tuple(kernel.shape)} but adapter #{index} "
                    f"maps ({w.in_features}, {w.out_features}) (a{tuple(w.a.shape)}, "
                    f"b{tuple(w.b.shape)})."
                )
            dtype = jnp.result_type(kernel.dtype, w.a.dtype)
            delta = (w.a.astype(dtype) @ w.b.astype(dtype)) * w.scale.astype(dtype)
            if safe and not bool(jnp.all(jnp.isfinite(delta))):
                raise NonFiniteError(
                    f"adapter #{index}, layer {path!r}: the delta scale * a @ b has NaN/Inf "
                    f"(scale={float(w.scale)}); nothing was merged. Check the adapter weights."
                )
            if path in out:
                prev_kernel, prev = out[path]
                dtype = jnp.result_type(prev.dtype, delta.dtype)
                out[path] = (prev_kernel, prev.astype(dtype) + delta.astype(dtype))
            else:
                out[path] = (kernel, delta)
    return out


def merge(params: Any, adapters: Adapter | Sequence[Adapter], *, safe: bool = False) -> Any:
    """New parameters with `kernel + scale * a @ b` at every targeted path (SW-MERGE-1).

    Arguments:
        params: a `DenseChain` or a nested parameter tree (see `jaxlora.params`).
        adapters: one adapter, or a sequence (e.g. `select(bank, [...])`; deltas summed).
        safe: refuse (`NonFiniteError`) before building anything if a delta has NaN/Inf. Needs
            concrete arrays (not under `jit`).

    Returns:
        The merged tree; `params` itself is unchanged (SW-MERGE-2).
    """
    deltas = _deltas(params, _as_adapters(adapters), safe)
    return with_kernels(
        params,
        {p: (k.astype(d.dtype) + d).astype(k.dtype) for p, (k, d) in deltas.items()},
    )


def unmerge(params: Any, adapters: Adapter | Sequence[Adapter]) -> Any:
    """New parameters with the delta subtracted again (SW-MERGE-3): equal to the original within
    the tolerance policy, not bitwise. To go back exactly, keep the unmerged tree instead."""
    deltas = _deltas(params, _as_adapters(adapters), safe=False)
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
            a = sum(np.sign(c) * math.sqrt(abs(c)) * w.a.astype(dtype) for _, c, w in parts)
            b = sum(math.sqrt(abs(c)) * w.b.astype(dtype) for _, c, w in parts)
        else:
            delta = sum(
                c * (w.a.astype(jnp.float32) @ w.b.astype(jnp.float32)) for _, c, w in parts
            )
            k = svd_rank if svd_rank is not None else max(w.rank for _, _, w in parts)
            if k <= 0:
                raise ConfigError(f"`svd_rank` must be positive, got {svd_rank}.")
            k = min(k, *delta.shape)
            u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
            a = (u[:, :k] * s[:k]).astype(dtype)
            b = vt[:k].astype(dtype)
        out[path] = LoraWeights(a, b, one)
    if not out:
        raise ConfigError(f"adapters {format_names(names)} target no layer; nothing to combine.")
    return out
