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

from .errors import ConfigError, ShapeMismatchError
from .lora import add_lora, check_selection
from .types import LoraSelection, Routing

__all__ = ["DenseChain", "forward"]

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
        if any(getattr(k, "shape", None) is None for k in self.kernels):
            return  # placeholders during pytree unflattening
        shapes = [tuple(k.shape) for k in self.kernels]
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
        return {
            p: (int(k.shape[0]), int(k.shape[1]))
            for p, k in zip(self.paths, self.kernels, strict=True)
        }

    def lora_kernels(self) -> dict[str, Array]:
        """`path -> kernel`: with `replace_kernels`, the `jaxlora.params.KernelHolder` protocol."""
        return dict(zip(self.paths, self.kernels, strict=True))

    def replace_kernels(self, kernels: Mapping[str, Array]) -> DenseChain:
        """A new chain with the kernels at the given paths replaced."""
        new = tuple(kernels.get(p, k) for p, k in zip(self.paths, self.kernels, strict=True))
        return dataclasses.replace(self, kernels=new)


def forward(
    model: DenseChain, x: Array, lora: LoraSelection = None, *, routing: Routing = "auto"
) -> Array:
    """The chain's output with the LoRA selection applied (SW-MODEL-1, SW-FORWARD-1).

    Arguments:
        model: the base model.
        x: `[..., in]` (`[batch, ..., in]` for a mixed batch).
        lora: `jaxlora.select(bank, ...)`, one adapter, `stacked.route(names)` (row `i` uses
            its own adapter, SW-MIXED-1) or None (the base model). A path the model lacks
            raises `TargetNotFoundError` (SW-TARGET-2).
        routing: the mixed-batch kernel (`jaxlora.routing.ROUTINGS`).
    """
    batch = int(jnp.shape(x)[0]) if jnp.ndim(x) else None
    sel = check_selection(lora, model.layer_shapes(), batch=batch)
    h = x
    last = len(model.paths) - 1
    for i, (path, kernel, bias) in enumerate(
        zip(model.paths, model.kernels, model.biases, strict=True)
    ):
        h = add_lora(h @ kernel + bias, h, sel, path, routing=routing)
        if i < last:
            h = jnp.tanh(h)
    return h
