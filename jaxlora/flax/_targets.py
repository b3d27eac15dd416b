"""What the Linen and NNX integrations share: layer descriptions and adding the LoRA delta.

A targeted layer is described by a `DenseSpec` (dotted path, the input feature axes it contracts
and the output feature axes it produces). A layer whose kernel is `[in..., out...]` (Dense,
DenseGeneral, Linear, LinearGeneral) is adapted as the 2-D layer `[prod(in), prod(out)]`: the
input's trailing feature axes are flattened, the delta computed, and reshaped to the output's
feature axes (spec SW-FLAX-2). Contracting non-trailing axes or using batch axes is refused.

Example:
    >>> spec = DenseSpec("attn.out", "DenseGeneral", in_shape=(2, 4), out_shape=(8,))
    >>> spec.features
    (8, 8)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ..bank import StackedBank
from ..errors import (
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
    format_names,
)
from ..layer import add_deltas, add_routed, lora_delta
from ..routing import routed_delta
from ..weights import LoraWeights

__all__ = ["DenseSpec", "LoraRequest", "add_lora", "check_targets", "trailing_axes"]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    """One linear layer of a Flax model.

    Arguments:
        path: dotted module path (`block_0.attn.query`).
        kind: the Flax class name.
        in_shape: the input feature axes the kernel contracts (trailing axes of `x`).
        out_shape: the output feature axes (trailing axes of `y`).
        unsupported: why jaxlora cannot adapt this layer, or None.
    """

    path: str
    kind: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    unsupported: str | None = None

    @property
    def features(self) -> tuple[int, int]:
        """`(in, out)` of the equivalent 2-D layer: what `init_adapter` takes."""
        return math.prod(self.in_shape), math.prod(self.out_shape)


@dataclasses.dataclass(frozen=True)
class LoraRequest:
    """What to add: an active set (`jaxlora.select`) or a stacked bank with per-row ids."""

    active: tuple[Mapping[str, LoraWeights], ...] = ()
    stacked: StackedBank | None = None
    ids: Array | None = None
    routing: str = "auto"

    @classmethod
    def build(cls, active: Any, stacked: Any, ids: Any, routing: str) -> LoraRequest:
        if stacked is not None or ids is not None:
            if stacked is None or ids is None or active:
                raise ConfigError(
                    "a mixed batch needs both `stacked` (jaxlora.stack(...)) and `ids` (one slot "
                    "id per row, -1 for none), and no `active`; a single adapter for the whole "
                    "batch needs only `active` (jaxlora.select(bank, name))."
                )
            if not isinstance(stacked, StackedBank):
                raise ConfigError(f"`stacked` must be a StackedBank, got {type(stacked).__name__}.")
            return cls(stacked=stacked, ids=jnp.asarray(ids), routing=routing)
        if isinstance(active, Mapping):
            active = (active,)
        if not isinstance(active, Sequence) or not all(isinstance(a, Mapping) for a in active):
            raise ConfigError(
                "`active` must be the result of jaxlora.select(bank, names): a tuple of adapters "
                f"(`path -> LoraWeights`); got {type(active).__name__}."
            )
        return cls(active=tuple(active))

    def paths(self) -> set[str]:
        if self.stacked is not None:
            return set(self.stacked.weights)
        return {p for ad in self.active for p in ad}


def trailing_axes(axes: Sequence[int], ndim: int) -> bool:
    """Whether `axes` are the last `len(axes)` axes of an `ndim`-array, in order."""
    norm = [a % ndim for a in axes] if ndim else list(axes)
    return norm == list(range(ndim - len(axes), ndim))


def _check_weights(spec: DenseSpec, w: LoraWeights, stacked: bool) -> None:
    d_in, d_out = spec.features
    a_in, b_out = w.a.shape[-2], w.b.shape[-1]
    if (a_in, b_out) != (d_in, d_out):
        what = "stacked bank" if stacked else "adapter"
        raise ShapeMismatchError(
            f"layer {spec.path!r} ({spec.kind}, in {spec.in_shape} -> out {spec.out_shape}) is a "
            f"({d_in}, {d_out}) layer but the {what} has a{tuple(w.a.shape)} b{tuple(w.b.shape)}. "
            "Build adapters from jaxlora.flax.<linen|nnx>.layer_shapes(...) of this model."
        )


def add_lora(spec: DenseSpec, x: Array, y: Array, request: LoraRequest) -> Array:
    """`y` (the layer's base output for input `x`) plus the requested LoRA deltas.

    Follows SW-FORWARD-1 / SW-DTYPE-1: deltas in `promote(x, a)`, added to the promoted base
    output, cast back once; mixed-batch rows with id -1 return `y` unchanged (SW-MIXED-1).
    """
    if request.stacked is not None:
        weights = (
            [request.stacked.weights[spec.path]] if spec.path in request.stacked.weights else []
        )
    else:
        weights = [ad[spec.path] for ad in request.active if spec.path in ad]
    if not weights:
        return y
    if spec.unsupported:
        raise UnsupportedFeatureError(
            f"layer {spec.path!r} ({spec.kind}) cannot carry a LoRA adapter: {spec.unsupported}. "
            "Remove it from target_modules (or exclude_modules it)."
        )
    n_in, n_out = len(spec.in_shape), len(spec.out_shape)
    if tuple(x.shape[x.ndim - n_in :]) != spec.in_shape:
        raise ShapeMismatchError(
            f"layer {spec.path!r}: expected input feature axes {spec.in_shape}, got x"
            f"{tuple(x.shape)}."
        )
    lead = x.shape[: x.ndim - n_in]
    x2 = x.reshape((*lead, spec.features[0]))
    for w in weights:
        _check_weights(spec, w, request.stacked is not None)
    if request.stacked is not None:
        delta = routed_delta(x2, weights[0], request.ids, method=request.routing)
        deltas = [delta]
    else:
        deltas = [lora_delta(x2, w) for w in weights]
    out_shape = y.shape[: y.ndim - n_out] + spec.out_shape
    if request.stacked is not None:
        return add_routed(y, deltas[0].reshape(out_shape), request.ids)
    return add_deltas(y, [d.reshape(out_shape) for d in deltas])


def check_targets(request: LoraRequest, layers: Mapping[str, DenseSpec]) -> None:
    """Raise `TargetNotFoundError` if the request targets a path that is not a linear layer."""
    missing = sorted(request.paths() - set(layers))
    if missing:
        raise TargetNotFoundError(
            f"the adapter targets {format_names(missing)}, which are not linear layers of this "
            f"model (or were not called). Linear layers: {format_names(sorted(layers))}."
        )
