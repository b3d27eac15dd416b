"""THE seam: one per-layer function and one validator, called by every model.

Every integration (the spec chain, Linen, NNX, the Llama family, generation, serving, training)
receives the LoRA selection through `lora=` and the mixed-batch kernel through `routing=`, turns
the selection into its canonical form once with `as_selection`, checks it against the model's
layers with `check_selection`, and at every linear layer calls `add_lora` (or `lora_dense`,
which is `add_lora` on `x @ kernel + bias`).

`lora=` takes:
- `None`: the base model, no LoRA computation at all;
- `jaxlora.select(bank, ...)` (an `Active`): the same adapters for every row; `select(bank,
  None)` is the base model with the bank's structure (SW-ACTIVE-2, SW-ACTIVE-4);
- one adapter (`path -> LoraWeights`), the same as `Active.of(adapter)`;
- a `Routed(stacked, ids)` (`stacked.route(names)`): row `i` uses slot `ids[i]`.

Example:
    >>> import jax.numpy as jnp
    >>> x, kernel = jnp.ones((2, 3)), jnp.eye(3)
    >>> w = LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 3)), jnp.asarray(0.5))
    >>> lora_dense(x, kernel, None, {"l0": w}, "l0").tolist()
    [[2.5, 2.5, 2.5], [2.5, 2.5, 2.5]]
    >>> lora_dense(x, kernel, None, Active.of({"l0": w}, gate=[False]), "l0").tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError, ShapeMismatchError, TargetNotFoundError, format_names
from .routing import routed_delta
from .types import NO_ADAPTER, Active, Dropout, LoraSelection, LoraWeights, Routed, Routing

__all__ = [
    "add_lora",
    "as_selection",
    "check_ids",
    "check_selection",
    "check_targets",
    "check_weights",
    "lora_delta",
    "lora_dense",
    "lora_input",
]

Array = jax.Array

_FORMS = (
    "`lora=` takes jaxlora.select(bank, names), one adapter (`layer path -> LoraWeights`), "
    "stacked.route(names) for a mixed batch, or None for the base model"
)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", None) or np.shape(x))


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _is_adapter(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(w, LoraWeights) for w in value.values())


def as_selection(lora: LoraSelection) -> Active | Routed | None:
    """The canonical form of a `lora=` argument: `Active`, `Routed` or `None`.

    Example:
        >>> as_selection(None) is None
        True
    """
    if lora is None or isinstance(lora, Active | Routed):
        return lora
    if _is_adapter(lora):
        return Active.of(lora)
    hint = ""
    if isinstance(lora, tuple | list):
        hint = " (a tuple or list of adapters is not accepted: use jaxlora.select(bank, names))"
    elif isinstance(lora, str):
        hint = f" (a name: use jaxlora.select(bank, {lora!r}))"
    raise ConfigError(f"{_FORMS}; got {type(lora).__name__}{hint}.")


def check_weights(
    w: Any,
    *,
    where: str,
    features: tuple[int, int] | None = None,
    stacked: bool = False,
) -> None:
    """Raise unless `w` is well-formed LoRA weights (and fits a `features = (in, out)` layer).

    The one validator of LoRA factors: banks, slots, loaders and every forward call it. Shapes
    are static, so under `jit` it runs once while tracing and costs nothing at run time.

    Arguments:
        w: the weights to check.
        where: how messages name them (`"adapter 'a', layer 'blocks.0.q'"`).
        features: the layer's `(in, out)`, or None to check only `w` itself.
        stacked: `w` is slot-major (`a [S, in, r]`, `b [S, r, out]`, `scale [S]`).

    Example:
        >>> w = LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> check_weights(w, where="layer 'l0'", features=(3, 2))
    """
    if not isinstance(w, LoraWeights):
        raise ConfigError(f"{where}: expected LoraWeights, got {type(w).__name__}.")
    a, b, s = _shape(w.a), _shape(w.b), _shape(w.scale)
    nd = 3 if stacked else 2
    layout = "a [S, in, r], b [S, r, out], scale [S]" if stacked else "a [in, r], b [r, out]"
    if len(a) != nd or len(b) != nd or a[-1] != b[-2] or (stacked and a[0] != b[0]):
        raise ShapeMismatchError(
            f"{where}: expected {layout}, got a{a} and b{b}."
            + (
                " Build stacked weights with jaxlora.stack(jaxlora.conform(bank))."
                if stacked
                else ""
            )
        )
    if s != a[:-2]:
        raise ShapeMismatchError(
            f"{where}: scale must have shape {a[:-2]} ({'one per slot' if stacked else '0-d'}), "
            f"got {s}."
        )
    dtypes = [_dtype(x) for x in (w.a, w.b, w.scale)]
    if not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        kinds = sorted({str(d) for d in dtypes})
        raise ConfigError(
            f"{where}: a, b and scale must be floating point, got {kinds}. Cast them, e.g. "
            "jnp.asarray(a, jnp.float32)."
        )
    if features is not None and (a[-2], b[-1]) != tuple(features):
        raise ShapeMismatchError(
            f"{where}: the layer maps {tuple(features)} (in, out) but the LoRA weights are a{a} "
            f"b{b}, which map ({a[-2]}, {b[-1]}). Was the adapter made for another model, or are "
            "PEFT's [r, in] / [out, r] weights not transposed?"
        )


def check_targets(
    paths: set[str] | list[str],
    layers: Mapping[str, Any],
    what: str,
    *,
    fix: str = "Was the adapter made for another model, or do its paths need a key_map?",
) -> None:
    """Raise `TargetNotFoundError` for paths that are not among `layers` (SW-TARGET-2).

    The message lists exactly the paths `layers` accepts, then `fix` (how to repair it).

    Example:
        >>> check_targets({"l0"}, {"l0": (2, 2), "l1": (2, 2)}, "the adapter")
    """
    missing = sorted(set(paths) - set(layers))
    count = f" ({len(missing)} layer(s))" if len(missing) > 1 else ""
    if missing:
        raise TargetNotFoundError(
            f"{what} targets {format_names(missing)}{count}, which the model does not have as "
            f"adaptable linear layers. Accepted paths: "
            f"{format_names(sorted(layers))}. {fix}"
        )


def check_ids(ids: Any, batch: int | None, *, where: str = "the selection") -> None:
    """Raise unless a `Routed`'s ids are integers of shape `[batch]` (any length if None).

    Example:
        >>> check_ids(jnp.asarray([0, -1]), 2)
    """
    if not jnp.issubdtype(_dtype(ids), jnp.integer):
        raise ConfigError(
            f"{where}: Routed ids must be integers (slot index, {NO_ADAPTER} for none), got "
            f"{_dtype(ids)}. Build them with stacked.route(names)."
        )
    if len(_shape(ids)) != 1 or (batch is not None and _shape(ids)[0] != batch):
        raise ShapeMismatchError(
            f"{where}: Routed ids have shape {_shape(ids)} but the batch has {batch} rows; give "
            f"one slot id per row (stacked.route(names), None / {NO_ADAPTER} for the base model)."
        )


def check_selection(
    lora: LoraSelection,
    layers: Mapping[str, tuple[int, int]],
    *,
    batch: int | None = None,
) -> Active | Routed | None:
    """`as_selection(lora)`, checked against the model's layers `path -> (in, out)`.

    Raises `TargetNotFoundError` for a path the model lacks, `ShapeMismatchError` for weights
    that do not fit their layer or per-row ids that are not `[batch]`, `ConfigError` otherwise.

    Example:
        >>> w = LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> check_selection({"l0": w}, {"l0": (3, 2)}).gate.tolist()
        [True]
    """
    sel = as_selection(lora)
    if isinstance(sel, Routed):
        check_ids(sel.ids, batch)
        check_targets(sel.paths(), layers, "the stacked bank")
        for path, w in sel.stacked.weights.items():
            where = f"stacked bank, layer {path!r}"
            check_weights(w, where=where, features=layers[path], stacked=True)
    elif isinstance(sel, Active):
        if _shape(sel.gate) != (len(sel.adapters),):
            raise ShapeMismatchError(
                f"Active.gate has shape {_shape(sel.gate)} for {len(sel.adapters)} adapters; "
                "build selections with jaxlora.select or Active.of."
            )
        for i, adapter in enumerate(sel.adapters):
            check_targets(set(adapter), layers, f"active adapter #{i}")
            for path, w in adapter.items():
                where = f"active adapter #{i}, layer {path!r}"
                check_weights(w, where=where, features=layers[path])
    return sel


def lora_delta(x: Array, w: LoraWeights) -> Array:
    """`((x @ a) @ b) * scale` in `promote(x, a)` (spec SW-FORWARD-1, SW-DTYPE-1).

    Example:
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(2.0))
        >>> lora_delta(jnp.ones((1, 2)), w).tolist()
        [[4.0, 4.0]]
    """
    dtype = jnp.result_type(x.dtype, w.a.dtype)
    h = x.astype(dtype) @ jnp.asarray(w.a).astype(dtype)
    return (h @ jnp.asarray(w.b).astype(dtype)) * jnp.asarray(w.scale).astype(dtype)


def lora_input(
    x: Array, dropout: Dropout | None, path: str, index: int, dtype: Any, rate: Array | None = None
) -> Array:
    """What the factors of adapter #`index` see at `path`: `x` in `dtype`, with PEFT's dropout
    when the selection carries a `Dropout` (training; spec SW-TRAIN-3).

    Each element is zeroed with probability `rate` and the others scaled by `1 / (1 - rate)`.
    The mask comes from `uniform(fold_in(fold_in(key, crc32(path)), index))`: independent per
    layer and per adapter; with one key per row (`key [batch]`) a row's mask depends on its own
    key only. `rate` (default `dropout.rate`) is 0-d or one value per row.

    Example:
        >>> x = jnp.ones((1, 1000))
        >>> d = Dropout(jax.random.key(0), jnp.asarray(0.5))
        >>> sorted(set(lora_input(x, d, "l0", 0, jnp.float32)[0].tolist()))
        [0.0, 2.0]
    """
    x = x.astype(dtype)
    if dropout is None:
        return x
    keys = dropout.key
    if not jnp.issubdtype(_dtype(keys), jax.dtypes.prng_key):
        raise ConfigError(
            f"layer {path!r}: the dropout key must be a typed PRNG key (jax.random.key(seed)), "
            f"got an array of dtype {_dtype(keys)}."
        )
    if _shape(keys) not in ((), x.shape[:1]):
        raise ShapeMismatchError(
            f"layer {path!r}: the dropout key has shape {_shape(keys)}; give one key, or one per "
            f"row of the input x{tuple(x.shape)} (shape {x.shape[:1]})."
        )
    rate = jnp.asarray(dropout.rate if rate is None else rate, jnp.float32)
    layer = zlib.crc32(path.encode("utf-8")) & 0x7FFFFFFF

    def uniform(key: Array, shape: tuple[int, ...]) -> Array:
        key = jax.random.fold_in(jax.random.fold_in(key, layer), index)
        return jax.random.uniform(key, shape)

    if keys.ndim == 0:
        u = uniform(keys, x.shape)
    else:
        u = jax.vmap(lambda k: uniform(k, x.shape[1:]))(keys)
    rate = rate.reshape(rate.shape + (1,) * (x.ndim - rate.ndim))
    keep = jnp.where(rate < 1, 1 / (1 - jnp.where(rate < 1, rate, 0.0)), 0.0)  # rate 1: all 0
    return x * jnp.where(u >= rate, keep, 0.0).astype(dtype)


def _dropout_rate(dropout: Dropout, count: int, what: str) -> Array:
    """`dropout.rate` checked: 0-d, or one value per adapter / slot (`count`)."""
    rate = jnp.asarray(dropout.rate)
    if rate.shape not in ((), (count,)):
        raise ShapeMismatchError(
            f"the dropout rate has shape {rate.shape}; give one rate, or one per {what} "
            f"(shape ({count},))."
        )
    return rate


def _gated_on(gate: Array) -> bool | None:
    """`True`/`False` for a concrete gate, `None` when it is traced (decided at run time)."""
    try:
        return bool(gate)
    except jax.errors.ConcretizationTypeError:  # traced under jit
        return None


def add_lora(
    y: Array,
    x: Array,
    lora: Active | Routed | None,
    path: str,
    *,
    routing: Routing = "auto",
    in_ndim: int = 1,
    out_ndim: int = 1,
) -> Array:
    """The layer output `y` (for input `x`) plus the LoRA deltas `lora` holds for `path`.

    The one per-layer function (SW-FORWARD-1, SW-DTYPE-1, SW-MIXED-1, SW-ACTIVE-4): deltas are
    computed in `promote(x, a)`, added in order to `y` promoted to their dtype, and the sum is
    cast back to `y`'s dtype once. A gated-off adapter and a mixed-batch row with id -1 leave
    `y` bit-identical. A layer with several input / output feature axes (DenseGeneral,
    LinearGeneral) is adapted as the 2-D layer `[prod(in), prod(out)]`: give `in_ndim` /
    `out_ndim` (spec SW-FLAX-2). A selection that carries a `Dropout` (training) applies it to
    the factors' input only (`lora_input`); `y` is never touched by it (SW-TRAIN-3).

    Arguments:
        y: the base output `[..., *out]`.
        x: the layer input `[..., *in]` (same leading axes as `y`; for `Routed` the first axis
            is the batch).
        lora: the canonical selection (`as_selection`), or None.
        path: the layer's path, the key adapters use.
        routing: the mixed-batch kernel (`jaxlora.routing`).
    """
    if lora is None:
        return y
    if isinstance(lora, Routed):
        w = lora.stacked.weights.get(path)
        weights = [] if w is None else [(None, w)]
    else:
        weights = [(i, ad[path]) for i, ad in enumerate(lora.adapters) if path in ad]
    if not weights:
        return y
    lead = x.shape[: x.ndim - in_ndim]
    x2 = x.reshape((*lead, math.prod(x.shape[x.ndim - in_ndim :])))
    features = (x2.shape[-1], math.prod(y.shape[y.ndim - out_ndim :]))
    where = f"layer {path!r}"
    if isinstance(lora, Routed):
        check_weights(
            weights[0][1], where=f"stacked bank, {where}", features=features, stacked=True
        )
        ids = jnp.asarray(lora.ids)
        check_ids(ids, int(x.shape[0]), where=f"{where} (input x{tuple(x.shape)})")
        xr = x2
        if lora.dropout is not None:
            st = weights[0][1]
            rate = _dropout_rate(lora.dropout, st.a.shape[0], "slot")
            rows = rate if rate.ndim == 0 else rate[jnp.maximum(ids, 0)]
            xr = lora_input(x2, lora.dropout, path, 0, jnp.result_type(x2, st.a), rows)
        delta = routed_delta(xr, weights[0][1], ids, routing=routing).reshape(y.shape)
        acc = (y.astype(jnp.result_type(y.dtype, delta.dtype)) + delta).astype(y.dtype)
        none = (ids == NO_ADAPTER).reshape(ids.shape + (1,) * (y.ndim - 1))
        return jnp.where(none, y, acc)
    live = []
    for i, w in weights:
        check_weights(w, where=f"active adapter #{i}, {where}", features=features)
        on = _gated_on(lora.gate[i])
        if on is not False:
            xi = x2
            if lora.dropout is not None:
                rate = _dropout_rate(lora.dropout, len(lora.adapters), "active adapter")
                rate = rate if rate.ndim == 0 else rate[i]
                xi = lora_input(x2, lora.dropout, path, i or 0, jnp.result_type(x2, w.a), rate)
            live.append((on, lora.gate[i], lora_delta(xi, w).reshape(y.shape)))
    if not live:
        return y
    acc = y.astype(jnp.result_type(y.dtype, *(d.dtype for _, _, d in live)))
    for on, gate, d in live:
        acc = acc + d if on else jnp.where(gate, acc + d, acc)
    return acc.astype(y.dtype)


def lora_dense(
    x: Array,
    kernel: Array,
    bias: Array | None,
    lora: LoraSelection,
    path: str,
    *,
    routing: Routing = "auto",
) -> Array:
    """`x @ kernel (+ bias)` plus the deltas `lora` holds for `path` (`add_lora`).

    Arguments:
        x: `[..., in]`.
        kernel: `[in, out]`.
        bias: `[out]` or None.
        lora: any `lora=` form (see the module docstring).
        path: the layer's path.
        routing: the mixed-batch kernel.
    """
    y = x @ kernel
    if bias is not None:
        y = y + bias
    return add_lora(y, x, as_selection(lora), path, routing=routing)
