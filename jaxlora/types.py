"""The leaf values every part of jaxlora passes around (imports only `jaxlora.errors`).

- `LoraWeights(a, b, scale)`: the factors of one targeted linear layer.
- An adapter: a mapping `layer path -> LoraWeights`.
- `Active`: what `jaxlora.select` returns, the adapters applied to the whole batch, each with a
  gate (`True`: applied; `False`: contributes exactly nothing, SW-ACTIVE-4).
- `Routed`: a mixed batch, row `i` uses slot `ids[i]` of a `StackedBank` (`NO_ADAPTER`: none).
- `StackedBank`: slot-major arrays of a conformed bank.
- `Dropout(key, rate)`: dropout on the LoRA input, carried by a selection in training only.

Every integration takes one of these through the keyword `lora=` (or `None`: the base model
with no LoRA computation at all) and the mixed-batch kernel through `routing=`.

Example:
    >>> import jax.numpy as jnp
    >>> w = LoraWeights(jnp.ones((3, 2)), jnp.zeros((2, 5)), jnp.asarray(0.5))
    >>> stacked = StackedBank({"l0": LoraWeights(w.a[None], w.b[None], w.scale[None])}, ("x",))
    >>> stacked.route(["x", None]).ids.tolist()
    [0, -1]
    >>> stacked
    StackedBank(slots=('x',), layers=1, rank=2)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from .errors import AdapterNotFoundError, format_names

__all__ = [
    "NO_ADAPTER",
    "Active",
    "Adapter",
    "Dropout",
    "LoraSelection",
    "LoraWeights",
    "Routed",
    "Routing",
    "StackedBank",
]

Array = jax.Array

#: The per-row id of a mixed-batch row that uses no adapter (spec SW-MIXED-1).
NO_ADAPTER = -1

#: The mixed-batch kernels (`jaxlora.routing`); `"auto"` chooses from static shapes.
Routing: TypeAlias = Literal["auto", "gather", "onehot", "ragged"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights:
    """The LoRA factors of one targeted linear layer.

    Arguments:
        a: `[in, r]` (or `[slots, in, r]` once stacked).
        b: `[r, out]` (or `[slots, r, out]`).
        scale: a 0-d array (or `[slots]`): a pytree *leaf*, so adapters with different alpha
            share one compilation. Training never updates it (see `jaxlora.train`).

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((3, 2)), jnp.zeros((2, 5)), jnp.asarray(0.5))
        >>> w.rank, w.in_features, w.out_features
        (2, 3, 5)
    """

    a: Array
    b: Array
    scale: Array

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[-2])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[-1])

    def delta(self) -> Array:
        """The dense update `scale * a @ b` (`[in, out]`), as merged into a kernel."""
        return self.scale.astype(self.a.dtype) * (self.a @ self.b)


#: An adapter: an immutable-by-convention mapping `layer path -> LoraWeights`.
Adapter: TypeAlias = Mapping[str, LoraWeights]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout on the input of the LoRA factors, PEFT's `lora_B(lora_A(dropout(x)))` (training).

    A selection carries it in training only (`jaxlora.train.dropout`); without it a forward is
    the inference forward, where dropout is the identity (spec SW-TRAIN-3). `jaxlora.lora.add_lora`
    draws the masks.

    Arguments:
        key: a typed PRNG key (`jax.random.key`), or one per batch row (`[batch]`): a row's
            masks then depend only on its own key, not on the rest of the batch.
        rate: the drop probability: a 0-d float array, or one per adapter of an `Active` /
            one per slot of a `Routed`'s stacked bank.

    Example:
        >>> import jax
        >>> Dropout(jax.random.key(0), jnp.asarray(0.1)).rate.shape
        ()
    """

    key: Array
    rate: Array


def _concrete(x: Array) -> object:
    """`x` as a list for reprs, or `"traced"` under `jit`."""
    try:
        return np.asarray(x).tolist()
    except jax.errors.TracerArrayConversionError:
        return "traced"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Active:
    """The adapters applied to every row of a batch, in order, each behind a gate.

    `gate[i]` is a boolean array leaf: `True` adds adapter `i`'s delta, `False` leaves the layer
    output exactly as it was (SW-ACTIVE-4). `jaxlora.select(bank, None)` on a non-empty bank is
    the first adapter gated off: the base model with the bank's structure, so it runs inside the
    same compilation as every adapter (SW-ACTIVE-2).

    Arguments:
        adapters: one `path -> LoraWeights` mapping per active adapter.
        gate: `[len(adapters)]` bool.
        dropout: `Dropout` on the LoRA input (training), or None (inference).

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> act = Active.of({"l0": w})
        >>> len(act.adapters), act.gate.tolist()
        (1, [True])
    """

    adapters: tuple[dict[str, LoraWeights], ...]
    gate: Array
    dropout: Dropout | None = None

    @classmethod
    def of(cls, *adapters: Adapter, gate: Sequence[bool] | None = None) -> Active:
        """The adapters, all gated on unless `gate` says otherwise."""
        on = [True] * len(adapters) if gate is None else list(gate)
        return cls(tuple(dict(a) for a in adapters), jnp.asarray(np.asarray(on, dtype=bool)))

    def paths(self) -> set[str]:
        """Every layer path some active adapter targets."""
        return {p for ad in self.adapters for p in ad}

    def __repr__(self) -> str:
        gate = _concrete(self.gate)
        layers = [len(ad) for ad in self.adapters]
        extra = "" if self.dropout is None else ", dropout=on"
        return f"Active(adapters={len(self.adapters)}, layers={layers}, gate={gate}{extra})"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StackedBank:
    """Slot-major arrays for mixed batches: per path `a [S, in, R]`, `b [S, R, out]`, `scale [S]`.

    `names[i]` is the adapter in slot `i`; a row with id `NO_ADAPTER` (-1) uses no adapter and
    costs no slot. `names` is static metadata: renaming a slot retraces a function jitted over
    the whole `StackedBank` (SW-SLOT-2); jit over `stacked.weights` to avoid it.

    Example:
        >>> StackedBank({}, ("a", "b")).ids(["b", None, "a"]).tolist()
        [1, -1, 0]
    """

    weights: dict[str, LoraWeights]
    names: tuple[str, ...] = dataclasses.field(metadata={"static": True})

    @functools.cached_property
    def _slot_of(self) -> dict[str, int]:
        """`name -> slot`, built once per bank so `ids` costs O(rows), not O(rows * slots)."""
        return {name: i for i, name in enumerate(self.names)}

    def slot(self, name: str) -> int:
        """The slot index of `name`."""
        try:
            return self._slot_of[name]
        except (KeyError, TypeError):
            raise AdapterNotFoundError(
                f"no adapter named {name!r} in the stacked bank. Slots: {format_names(self.names)}."
            ) from None

    def ids(self, rows: Sequence[str | None]) -> np.ndarray:
        """Per-row slot ids (int32) for a mixed batch; `None` means no adapter."""
        return np.asarray([NO_ADAPTER if r is None else self.slot(r) for r in rows], dtype=np.int32)

    def route(self, rows: Sequence[str | None]) -> Routed:
        """`Routed(self, self.ids(rows))`: the `lora=` argument of a mixed batch."""
        return Routed(self, jnp.asarray(self.ids(rows)))

    def __repr__(self) -> str:
        ranks = sorted({w.rank for w in self.weights.values()})
        rank = ranks[0] if len(ranks) == 1 else ranks
        return f"StackedBank(slots={self.names}, layers={len(self.weights)}, rank={rank})"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routed:
    """A mixed batch: row `i` uses slot `ids[i]` of `stacked` (`NO_ADAPTER`: the base model).

    `dropout`: a `Dropout` on the LoRA input (training), or None (inference).

    Example:
        >>> Routed(StackedBank({}, ()), jnp.asarray([-1])).ids.tolist()
        [-1]
    """

    stacked: StackedBank
    ids: Array
    dropout: Dropout | None = None

    def paths(self) -> set[str]:
        """Every layer path the stacked bank targets."""
        return set(self.stacked.weights)

    def __repr__(self) -> str:
        ids = _concrete(self.ids)
        extra = "" if self.dropout is None else ", dropout=on"
        return f"Routed({self.stacked!r}, ids={ids}{extra})"


#: What `lora=` accepts: a selection, one adapter, or `None` (the base model, no LoRA code).
LoraSelection: TypeAlias = Active | Routed | Adapter | None
