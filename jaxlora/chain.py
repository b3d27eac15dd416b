"""The spec's model (SW-MODEL-1): a chain of named dense layers with `tanh` between them.

It is the model the spec, the NumPy reference and the conformance suite share: small, but it
has everything switching semantics needs (targeted and untargeted layers, several paths).

Example:
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> model = jaxlora.DenseChain.init(jax.random.key(0), ["blocks.0.q", "blocks.0.o"], [4, 8, 4])
    >>> model.layer_shapes()
    {'blocks.0.q': (4, 8), 'blocks.0.o': (8, 4)}
    >>> jaxlora.forward(model, jnp.ones((2, 4))).shape
    (2, 4)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .bank import Active, StackedBank
from .errors import ConfigError, ShapeMismatchError, TargetNotFoundError, format_names
from .layer import check_fits, lora_dense, lora_dense_mixed
from .weights import LoraWeights

__all__ = ["DenseChain", "forward", "forward_mixed"]

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseChain:
    """Named dense layers applied in order; `tanh` after every layer but the last.

    Arguments:
        paths: the layer paths, in application order (static metadata).
        kernels: `[in_i, out_i]` per layer, `out_i == in_{i+1}`.
        biases: `[out_i]` per layer.
    """

    kernels: tuple[Array, ...]
    biases: tuple[Array, ...]
    paths: tuple[str, ...] = dataclasses.field(metadata={"static": True})

    def __post_init__(self) -> None:
        if not (len(self.paths) == len(self.kernels) == len(self.biases)) or not self.paths:
            raise ConfigError(
                f"DenseChain needs one kernel and one bias per path; got {len(self.paths)} "
                f"paths, {len(self.kernels)} kernels, {len(self.biases)} biases."
            )
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"DenseChain paths must be unique: {self.paths}.")
        shapes = [getattr(k, "shape", None) for k in self.kernels]
        if any(s is None for s in shapes):  # placeholders during pytree unflattening
            return
        for i in range(len(shapes) - 1):
            if shapes[i][1] != shapes[i + 1][0]:
                raise ShapeMismatchError(
                    f"layer {self.paths[i]!r} outputs {shapes[i][1]} features but layer "
                    f"{self.paths[i + 1]!r} takes {shapes[i + 1][0]}."
                )

    @classmethod
    def from_layers(cls, layers: Mapping[str, tuple[Any, Any]], dtype: Any = None) -> DenseChain:
        """From an ordered mapping `path -> (kernel [in, out], bias [out])`."""
        return cls(
            tuple(jnp.asarray(k, dtype) for k, _ in layers.values()),
            tuple(jnp.asarray(b, dtype) for _, b in layers.values()),
            tuple(layers),
        )

    @classmethod
    def init(
        cls, key: Array, paths: Sequence[str], widths: Sequence[int], dtype: Any = jnp.float32
    ) -> DenseChain:
        """Random weights (uniform, scaled by `1/sqrt(in)`) for `len(paths)` layers."""
        if len(widths) != len(paths) + 1:
            raise ConfigError(f"need len(widths) == len(paths) + 1, got {widths} for {paths}.")
        layers = {}
        for i, path in enumerate(paths):
            kk, kb = jax.random.split(jax.random.fold_in(key, i))
            bound = 1.0 / math.sqrt(widths[i])
            layers[path] = (
                jax.random.uniform(kk, (widths[i], widths[i + 1]), dtype, -bound, bound),
                jax.random.uniform(kb, (widths[i + 1],), dtype, -bound, bound),
            )
        return cls.from_layers(layers)

    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        """`path -> (in, out)`, the argument `jaxlora.init_adapter` takes."""
        return {p: tuple(k.shape) for p, k in zip(self.paths, self.kernels, strict=True)}

    def replace_kernels(self, kernels: Mapping[str, Array]) -> DenseChain:
        """A new chain with the kernels at the given paths replaced."""
        new = tuple(kernels.get(p, k) for p, k in zip(self.paths, self.kernels, strict=True))
        return dataclasses.replace(self, kernels=new)


def _check_targets(model: DenseChain, adapters: Sequence[Mapping[str, Any]], what: str) -> None:
    """Every adapter path must name a layer of the model, with matching shapes (SW-TARGET-2)."""
    shapes = model.layer_shapes()
    for index, adapter in enumerate(adapters):
        for path, w in adapter.items():
            if path not in shapes:
                raise TargetNotFoundError(
                    f"{what} #{index} targets layer {path!r}, which the model does not have. "
                    f"Model layers: {format_names(model.paths)}. Was the adapter made for "
                    "another model, or does its path need a prefix stripped?"
                )
            check_fits(shapes[path], w, f"{what} #{index}, layer {path!r}")


def _as_active(active: Any) -> Active:
    """`select`'s tuple as is; one adapter (`path -> LoraWeights`) as a 1-tuple; else an error."""
    if isinstance(active, Mapping) and all(isinstance(w, LoraWeights) for w in active.values()):
        return (active,)
    if isinstance(active, tuple | list) and all(
        isinstance(ad, Mapping) and all(isinstance(w, LoraWeights) for w in ad.values())
        for ad in active
    ):
        return tuple(active)
    raise ConfigError(
        "`active` must be jaxlora.select(bank, ...) (a tuple of adapters) or one adapter "
        f"(`layer path -> LoraWeights`); got {type(active).__name__}. Example: "
        "forward(model, x, jaxlora.select(bank, 'name'))."
    )


def forward(model: DenseChain, x: Array, active: Active = ()) -> Array:
    """The chain's output with the active adapters applied (SW-MODEL-1, SW-FORWARD-1).

    Arguments:
        model: the base model.
        x: `[..., in]`.
        active: `jaxlora.select(bank, ...)`, or one adapter; adapters not targeting a layer
            skip it. An
            adapter path the model lacks raises `TargetNotFoundError` (SW-TARGET-2).
    """
    active = _as_active(active)
    _check_targets(model, active, "active adapter")
    h = x
    last = len(model.paths) - 1
    for i, (path, kernel, bias) in enumerate(
        zip(model.paths, model.kernels, model.biases, strict=True)
    ):
        h = lora_dense(h, kernel, bias, [ad[path] for ad in active if path in ad])
        if i < last:
            h = jnp.tanh(h)
    return h


def forward_mixed(
    model: DenseChain, x: Array, stacked: StackedBank, ids: Array, *, method: str = "auto"
) -> Array:
    """The chain with a per-row adapter: row `i` uses slot `ids[i]` (-1: none) (SW-MIXED-1).

    Arguments:
        model: the base model.
        x: `[batch, ..., in]`.
        stacked: `jaxlora.stack(conformed_bank)`.
        ids: `[batch]` int slot ids (`stacked.ids(names)`), `jaxlora.NO_ADAPTER` for none.
        method: the routing kernel (`jaxlora.routing.METHODS`).
    """
    if jnp.ndim(ids) != 1 or jnp.shape(ids)[0] != jnp.shape(x)[0]:
        raise ShapeMismatchError(
            f"forward_mixed: ids has shape {tuple(jnp.shape(ids))} but x has "
            f"{jnp.shape(x)[0]} rows (x{tuple(jnp.shape(x))}); give one adapter id per row "
            "(stacked.ids(names), NO_ADAPTER for a row without adapter)."
        )
    one_slot = {  # shapes of one slot, to check the stacked weights fit the model
        p: LoraWeights(
            jax.ShapeDtypeStruct(w.a.shape[1:], w.a.dtype),
            jax.ShapeDtypeStruct(w.b.shape[1:], w.b.dtype),
            w.scale,
        )
        for p, w in stacked.weights.items()
    }
    _check_targets(model, [one_slot], "stacked bank")
    h = x
    last = len(model.paths) - 1
    for i, (path, kernel, bias) in enumerate(
        zip(model.paths, model.kernels, model.biases, strict=True)
    ):
        w = stacked.weights.get(path)
        if w is None:
            h = lora_dense(h, kernel, bias)
        else:
            h = lora_dense_mixed(h, kernel, bias, w, ids, method=method)
        if i < last:
            h = jnp.tanh(h)
    return h
