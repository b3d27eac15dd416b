"""What is trained and what is not: `split` / `join`, and `dropout` for a training forward.

`split` turns any pytree holding `LoraWeights` (one adapter, an `AdapterBank`, a
`StackedBank`, `stacked.weights`) into two trees of the same shape: `trainable` keeps `a` and `b`
with `scale=None`, `frozen` keeps `scale` with `a=b=None`. `None` is an empty pytree node, so an
optax optimizer sees only the factors: `opt.init(trainable)`, `opt.update(grads, state,
trainable)` and `optax.apply_updates` never touch a scale, and no mask is needed (spec
SW-TRAIN-1). Rank is a shape and alpha lives only in the scale, so neither can change.

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxlora
    >>> w = jaxlora.LoraWeights(jnp.ones((3, 2)), jnp.zeros((2, 3)), jnp.asarray(4.0))
    >>> trainable, frozen = split({"l0": w})
    >>> len(jax.tree.leaves(trainable)), float(frozen["l0"].scale)
    (2, 4.0)
    >>> opt = optax.adam(1e-2)
    >>> grads = jax.tree.map(jnp.ones_like, trainable)
    >>> updates, _ = opt.update(grads, opt.init(trainable), trainable)
    >>> float(join(optax.apply_updates(trainable, updates), frozen)["l0"].scale)
    4.0
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ..lora import as_selection
from ..types import Active, Dropout, LoraSelection, LoraWeights, Routed

__all__ = ["dropout", "join", "split"]

T = TypeVar("T")

#: The empty part of a split `LoraWeights` (`None`: a pytree node without leaves).
_EMPTY: Any = None


def _is_weights(x: Any) -> bool:
    return isinstance(x, LoraWeights)


def split(tree: T) -> tuple[T, T]:
    """`(trainable, frozen)`: the factors `a`, `b` and the scales of every `LoraWeights` in `tree`.

    Arguments:
        tree: an adapter (`path -> LoraWeights`), an `AdapterBank`, a `StackedBank` or any
            pytree of `LoraWeights`.

    Returns:
        Two trees shaped like `tree`: in `trainable` every `LoraWeights` is `(a, b, None)`, in
        `frozen` it is `(None, None, scale)`. `join` puts them back together.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> trainable, frozen = split({"l0": w})
        >>> trainable["l0"].scale is None, frozen["l0"].a is None
        (True, True)
    """
    leaves = jax.tree.leaves(tree, is_leaf=_is_weights)
    if not any(_is_weights(x) for x in leaves):
        raise ConfigError(
            f"split expects an adapter, a bank or a stacked bank (a pytree of LoraWeights); got "
            f"{type(tree).__name__} without any LoraWeights."
        )
    trainable = jax.tree.map(
        lambda w: LoraWeights(w.a, w.b, _EMPTY) if _is_weights(w) else w, tree, is_leaf=_is_weights
    )
    frozen = jax.tree.map(
        lambda w: LoraWeights(_EMPTY, _EMPTY, w.scale) if _is_weights(w) else w,
        tree,
        is_leaf=_is_weights,
    )
    return trainable, frozen


def join(trainable: T, frozen: T) -> T:
    """The inverse of `split`: every `LoraWeights(a, b)` of `trainable` gets its `frozen` scale.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(3.0))
        >>> float(join(*split({"l0": w}))["l0"].scale)
        3.0
    """
    left = jax.tree.structure(trainable, is_leaf=_is_weights)
    right = jax.tree.structure(frozen, is_leaf=_is_weights)
    if left != right:
        raise ConfigError(
            "join: the trainable and frozen parts have different structures (different layer "
            f"paths or adapters): {left} vs {right}. Join the two halves of one split()."
        )

    def one(t: Any, f: Any) -> Any:
        if not _is_weights(t) or not _is_weights(f) or t.a is None or f.scale is None:
            raise ConfigError(
                "join(trainable, frozen) takes the two results of split(...) in that order."
            )
        return LoraWeights(t.a, t.b, f.scale)

    return jax.tree.map(one, trainable, frozen, is_leaf=_is_weights)


def dropout(lora: LoraSelection, key: jax.Array, rate: Any) -> Active | Routed:
    """`lora` with PEFT's dropout on the LoRA input: a training forward (spec SW-TRAIN-3).

    Each targeted layer then computes `y + scale * (dropout(x) @ a) @ b`; the base output `y`
    sees the undropped `x`. Without `dropout` (inference) nothing is dropped.

    Arguments:
        lora: any `lora=` value but None.
        key: a typed PRNG key (`jax.random.key`), or one per batch row (`[batch]`).
        rate: the drop probability in `[0, 1)`: a number, or one per adapter of a selection /
            per slot of a routed batch.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> dropout({"l0": w}, jax.random.key(0), 0.1)
        Active(adapters=1, layers=[1], gate=[True], dropout=on)
    """
    sel = as_selection(lora)
    if sel is None:
        raise ConfigError("dropout needs a LoRA selection (lora=None has nothing to drop).")
    try:
        values = np.asarray(rate, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError):
        values = None  # traced: the caller is inside jit
    if values is not None and not np.all((values >= 0) & (values < 1)):
        raise ConfigError(f"the dropout rate must be in [0, 1), got {rate!r}.")
    drop = Dropout(key, jnp.asarray(rate, jnp.float32))
    if isinstance(sel, Routed):
        return Routed(sel.stacked, sel.ids, drop)
    return Active(sel.adapters, sel.gate, drop)
