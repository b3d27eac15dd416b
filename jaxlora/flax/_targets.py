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
from collections.abc import Sequence

import jax

from ..errors import ShapeMismatchError, UnsupportedFeatureError
from ..lora import add_lora as lora_add
from ..types import Active, Routed, Routing

__all__ = ["DenseSpec", "add_lora", "trailing_axes"]

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


def trailing_axes(axes: Sequence[int], ndim: int) -> bool:
    """Whether `axes` are the last `len(axes)` axes of an `ndim`-array, in order."""
    norm = [a % ndim for a in axes] if ndim else list(axes)
    return norm == list(range(ndim - len(axes), ndim))


def add_lora(
    spec: DenseSpec, x: Array, y: Array, lora: Active | Routed | None, routing: Routing
) -> Array:
    """`y` (the layer's base output for input `x`) plus the LoRA deltas for `spec.path`.

    Checks what only Flax knows (the layer kind and its feature axes), then calls the one
    per-layer function `jaxlora.lora.add_lora` (SW-FORWARD-1, SW-DTYPE-1, SW-MIXED-1,
    SW-FLAX-2).
    """
    if lora is None or spec.path not in lora.paths():
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
    return lora_add(y, x, lora, spec.path, routing=routing, in_ndim=n_in, out_ndim=n_out)
