"""Place batches, banks, adapters and model weights on a `jax.sharding.Mesh` (SW-SHARD-1..3,
SW-TP-1..3).

JAX's sharding is the engine: these helpers only build `NamedSharding`s with the right
`PartitionSpec`s and `device_put` values with them. A mesh has a data axis (default `"data"`)
for batch rows, optionally a slot axis (default `"slot"`) for the bank and optionally a model
axis (default `"model"`) for tensor parallelism:

- the batch `x [B, ...]` and its ids `[B]` are split over `"data"` along rows;
- the bank is either replicated on every device (`mode="replicated"`: every device can route
  any row locally) or split over `"slot"` along its slot dimension (`mode="slot"`: each device
  group holds `S / n` slots; XLA inserts the collectives the routing kernel needs);
- with a model axis, each linear layer is split the Megatron way (`Split`): a `"column"` layer
  has its kernel split by output features, a `"row"` layer by input features. Its LoRA factors
  follow in one of two layouts (`LoraLayout`, SW-TP-5):
  `"replicate-factors"` (default) adds no collective of its own: for a column layer `A` is
  replicated and `B` split by output (`x @ A` is computed on every device, `(x @ A) @ B` gives
  each device its own output features); for a row layer `A` is split by input and `B`
  replicated (each device's `x @ A` is a partial sum over its input features, like the base
  `x @ W`, and XLA reduces the two partial sums in the one all-reduce of the layer's output).
  A device holds about `(1 + 1/m) / 2` of the bank. `"split-factors"` also splits the
  replicated factor by rank (column `A [in, r/m]`, row `B [r/m, out]`): a device holds `1/m`
  of the bank, at the cost of one all-gather of `x @ A` (`[tokens, r]`) per column layer and
  one all-reduce of the delta (`[tokens, out]`) per row layer; the rank must then be a
  multiple of `m`.

Then jit the forward with `out_shardings=batch_sharding(mesh, ...)` (or let propagation decide).

Multi-host: call `jax.distributed.initialize()` on every host before touching JAX, build the
mesh over `jax.devices()` (all hosts' devices), and give `shard_batch` each host's *local* rows:
when `jax.process_count() > 1` it assembles the global array with
`jax.make_array_from_process_local_data`. Every host must call the jitted forward with the same
shapes (SPMD). The bank and the adapters are identical on every host: `shard_bank` and
`shard_selection` build each host's shards from its own copy (`put`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> mesh = make_mesh(data=1)
    >>> x = shard_batch(jnp.ones((4, 3)), mesh)
    >>> x.sharding.spec
    P('data', None)
    >>> lora_specs("row").a, lora_specs("row").b
    (P('model',), P())
    >>> lora_specs("row", layout="split-factors").b
    P('model',)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import ConfigError, ShapeMismatchError
from .lora import as_selection
from .types import Active, LoraSelection, LoraWeights, Routed, StackedBank

#: How a stacked bank is placed: on every device, or split over the slot axis.
BankMode: TypeAlias = Literal["replicated", "slot"]
#: How a split layer's LoRA factors are placed over the model axis (SW-TP-5):
#: `"replicate-factors"` (column `A`, row `B` replicated: no collective of LoRA's own) or
#: `"split-factors"` (those split by rank too: `1/m` of the bank per device, more collectives).
LoraLayout: TypeAlias = Literal["replicate-factors", "split-factors"]
LORA_LAYOUTS: tuple[LoraLayout, ...] = ("replicate-factors", "split-factors")

__all__ = [
    "LORA_LAYOUTS",
    "BankMode",
    "LoraLayout",
    "LoraSpecs",
    "Split",
    "adapter_sharding",
    "bank_sharding",
    "batch_sharding",
    "device_bytes",
    "lora_specs",
    "make_mesh",
    "model_axis_size",
    "put",
    "shard_bank",
    "shard_batch",
    "shard_selection",
    "spec",
    "to_host",
]

DATA = "data"
SLOT = "slot"
MODEL = "model"

#: How a linear layer is split over the model axis: `"column"` (kernel split by output
#: features), `"row"` (by input features); a layer with no entry is replicated.
Split: TypeAlias = Literal["column", "row"]


def make_mesh(
    data: int | None = None, slot: int = 1, *, model: int | None = None, devices: Any = None
) -> Mesh:
    """A mesh `("data", "slot")` of `data * slot` devices, or `("data", "slot", "model")` of
    `data * slot * model` devices when `model` is given (default: the rest on data).

    The model axis is the innermost (neighbouring devices), where its per-layer all-reduces
    are cheapest.

    Example:
        >>> make_mesh(data=1, slot=1).axis_names
        ('data', 'slot')
        >>> make_mesh(data=1, model=1).axis_names
        ('data', 'slot', 'model')
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("slot", slot), ("model", 1 if model is None else model)):
        if not isinstance(size, int) or size < 1:
            raise ConfigError(f"make_mesh: `{name}` must be a positive device count, got {size}.")
    inner = slot * (1 if model is None else model)
    if data is None:
        data = len(devices) // inner
    if data < 1 or data * inner > len(devices):
        sizes = f"data={data} x slot={slot}" + ("" if model is None else f" x model={model}")
        raise ConfigError(
            f"a mesh of {sizes} devices needs {data * inner} devices; "
            f"{len(devices)} are available. Pick sizes whose product is <= {len(devices)}."
        )
    if model is None:
        grid = np.asarray(devices[: data * slot], dtype=object).reshape(data, slot)
        return Mesh(grid, (DATA, SLOT))
    grid = np.asarray(devices[: data * inner], dtype=object).reshape(data, slot, model)
    return Mesh(grid, (DATA, SLOT, MODEL))


def model_axis_size(mesh: Mesh, axis: str = MODEL) -> int:
    """The size of the model axis; 1 when the mesh has none (nothing is split)."""
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def put(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` placed with `sharding`, also over several processes (SW-TP-3).

    `x` is a host value (or array) that every process holds in full (weights, adapters): each
    process builds only the shards its own devices hold, with `jax.make_array_from_callback`.

    Example:
        >>> put(np.ones(2), NamedSharding(make_mesh(data=1), PartitionSpec())).shape
        (2,)
    """
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _axis_size(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ConfigError(f"the mesh has axes {tuple(mesh.shape)}; there is no axis {axis!r}.")
    return int(mesh.shape[axis])


def batch_sharding(mesh: Mesh, ndim: int = 1, *, axis: str = DATA) -> NamedSharding:
    """Rows (dimension 0) split over `axis`, the other `ndim - 1` dimensions replicated."""
    _axis_size(mesh, axis)
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def shard_batch(x: Any, mesh: Mesh, *, axis: str = DATA) -> jax.Array:
    """Place a batch (or its `[B]` ids) with rows split over `axis` (SW-SHARD-1).

    With several processes, `x` is this host's local rows and the result the global array.
    """
    size = _axis_size(mesh, axis)
    sharding = batch_sharding(mesh, np.ndim(x), axis=axis)
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    rows = np.shape(x)[0] if np.ndim(x) else 0
    if rows % size:
        raise ShapeMismatchError(
            f"a batch of {rows} rows cannot be split evenly over mesh axis {axis!r} of size "
            f"{size}; pad the batch to a multiple of {size} (padding rows can use id -1)."
        )
    return jax.device_put(x, sharding)


class LoraSpecs(NamedTuple):
    """The `PartitionSpec`s of one layer's LoRA factors `a`, `b` and `scale`."""

    a: PartitionSpec
    b: PartitionSpec
    scale: PartitionSpec


def lora_specs(
    split: Split | None,
    *,
    stacked: bool = False,
    slot_axis: str | None = None,
    axis: str = MODEL,
    layout: LoraLayout = "replicate-factors",
) -> LoraSpecs:
    """The `PartitionSpec`s of one layer's LoRA factors `a [in, r]`, `b [r, out]` (SW-TP-1,
    SW-TP-5).

    `"column"`: `b` split by output over `axis`, `a` replicated (`layout="replicate-factors"`)
    or split by rank (`"split-factors"`); `"row"`: `a` split by input, `b` replicated or split
    by rank; None: both replicated. `stacked` factors (`a [S, in, r]`) get `slot_axis` (None:
    replicated) on their slot dimension, `scale` too.

    Example:
        >>> lora_specs("column", stacked=True, slot_axis="slot").b
        P('slot', None, 'model')
        >>> lora_specs("column", stacked=True).a
        P()
        >>> lora_specs("column", stacked=True, layout="split-factors").a
        P(None, None, 'model')
    """
    if split not in ("column", "row", None):
        raise ConfigError(f"unknown split {split!r}; use 'column', 'row' or None (replicated).")
    _check_layout(layout)
    lead = (slot_axis,) if stacked else ()
    rank = axis if layout == "split-factors" else None
    if split == "column":
        return LoraSpecs(spec(*lead, None, rank), spec(*lead, None, axis), spec(*lead))
    if split == "row":
        return LoraSpecs(spec(*lead, axis, None), spec(*lead, rank, None), spec(*lead))
    return LoraSpecs(spec(*lead), spec(*lead), spec(*lead))


def _check_layout(layout: Any) -> None:
    if layout not in LORA_LAYOUTS:
        raise ConfigError(
            f"unknown lora_layout {layout!r}; use 'replicate-factors' (no collective of LoRA's "
            "own) or 'split-factors' (1/model-axis of the bank per device)."
        )


def spec(*axes: str | None) -> PartitionSpec:
    """`PartitionSpec(*axes)` without trailing Nones: one spelling per layout, so equal layouts
    are equal jit cache keys (`P(None, None)` and `P()` would compile twice).

    Example:
        >>> spec("data", None), spec(None, "model", None)
        (P('data',), P(None, 'model'))
    """
    while axes and axes[-1] is None:
        axes = axes[:-1]
    return PartitionSpec(*axes)


def _layer_sharding(
    w: LoraWeights,
    mesh: Mesh,
    path: str,
    split: Split | None,
    *,
    stacked: bool,
    slot_axis: str | None,
    axis: str,
    layout: LoraLayout,
    who: str,
) -> LoraWeights:
    size = model_axis_size(mesh, axis)
    if size == 1:
        split = None
    features = {"row": ("input", w.in_features), "column": ("output", w.out_features)}
    if split is not None and features[split][1] % size:
        kind, n = features[split]
        raise ShapeMismatchError(
            f"layer {path!r} is {split}-parallel but its LoRA factors have {n} {kind} features, "
            f"not a multiple of mesh axis {axis!r} of size {size}; use a model axis that "
            f"divides {n}."
        )
    if split is not None and layout == "split-factors" and w.rank % size:
        raise ConfigError(
            f"{who}, layer {path!r}: rank {w.rank} is not a multiple of mesh axis {axis!r} of "
            f"size {size}, which lora_layout='split-factors' splits it over; pad the rank with "
            f"jaxlora.conform(bank, max_rank={-(-w.rank // size) * size}) (zero padding changes "
            "no output) or use lora_layout='replicate-factors'."
        )
    specs = lora_specs(split, stacked=stacked, slot_axis=slot_axis, axis=axis, layout=layout)
    # The same pytree as `w` (a LoraWeights), its leaves shardings (a, b, scale in that order).
    return jax.tree.unflatten(jax.tree.structure(w), [NamedSharding(mesh, x) for x in specs])


def adapter_sharding(
    adapter: Mapping[str, LoraWeights],
    mesh: Mesh,
    splits: Mapping[str, Split | None] | None = None,
    *,
    axis: str = MODEL,
    lora_layout: LoraLayout = "replicate-factors",
    name: str = "the adapter",
) -> dict[str, LoraWeights]:
    """`path -> LoraWeights` of `NamedSharding`s for one adapter (SW-TP-1, SW-TP-5).

    `splits` maps layer paths to their `Split` (`jaxlora.models.tp.layer_splits` for the model
    families); layers it does not name, and every layer on a mesh without `axis`, are replicated.
    `lora_layout` places the factors as `lora_specs` says; `name` is the adapter errors name.
    """
    _check_layout(lora_layout)
    splits = splits or {}
    return {
        path: _layer_sharding(
            w,
            mesh,
            path,
            splits.get(path),
            stacked=False,
            slot_axis=None,
            axis=axis,
            layout=lora_layout,
            who=name,
        )
        for path, w in adapter.items()
    }


def bank_sharding(
    stacked: StackedBank,
    mesh: Mesh,
    mode: BankMode = "replicated",
    *,
    axis: str = SLOT,
    splits: Mapping[str, Split | None] | None = None,
    model_axis: str = MODEL,
    lora_layout: LoraLayout = "replicate-factors",
):
    """The `NamedSharding` pytree for `stacked` (same structure), for `device_put` or jit.

    `mode="replicated"`: every array on every device. `mode="slot"`: dimension 0 (slots) split
    over `axis`; the slot count must be a multiple of the axis size. With `splits` (layer path
    -> `Split`) and a mesh with `model_axis`, each layer's factors are also split over the model
    axis as `lora_specs(..., layout=lora_layout)` says (SW-TP-1, SW-TP-5).
    """
    if mode not in ("replicated", "slot"):
        raise ConfigError(f"unknown bank sharding mode {mode!r}; use 'replicated' or 'slot'.")
    _check_layout(lora_layout)
    slot_axis = None
    if mode == "slot":
        size = _axis_size(mesh, axis)
        slots = len(stacked.names)
        if slots % size:
            raise ShapeMismatchError(
                f"the stacked bank has {slots} slots ({stacked.names}), not a multiple of mesh "
                f"axis {axis!r} of size {size}; stack a multiple of {size} adapters (e.g. "
                "repeat one under another name) or use mode='replicated'."
            )
        slot_axis = axis
    splits = splits or {}
    who = f"the stacked bank of adapters {stacked.names}"
    weights = {
        path: _layer_sharding(
            w,
            mesh,
            path,
            splits.get(path),
            stacked=True,
            slot_axis=slot_axis,
            axis=model_axis,
            layout=lora_layout,
            who=who,
        )
        for path, w in stacked.weights.items()
    }
    return StackedBank(weights, stacked.names)


def shard_bank(
    stacked: StackedBank,
    mesh: Mesh,
    mode: BankMode = "replicated",
    *,
    axis: str = SLOT,
    splits: Mapping[str, Split | None] | None = None,
    model_axis: str = MODEL,
    lora_layout: LoraLayout = "replicate-factors",
) -> StackedBank:
    """`stacked` placed on `mesh`, replicated or split over the slot axis (SW-SHARD-2), its
    layers split over the model axis as `splits` and `lora_layout` say (SW-TP-1, SW-TP-5)."""
    shardings = bank_sharding(
        stacked,
        mesh,
        mode,
        axis=axis,
        splits=splits,
        model_axis=model_axis,
        lora_layout=lora_layout,
    )
    return jax.tree.map(put, stacked, shardings)


def shard_selection(
    lora: LoraSelection,
    mesh: Mesh,
    splits: Mapping[str, Split | None] | None = None,
    *,
    mode: BankMode = "replicated",
    data_axis: str = DATA,
    slot_axis: str = SLOT,
    model_axis: str = MODEL,
    lora_layout: LoraLayout = "replicate-factors",
) -> Active | Routed | None:
    """Any `lora=` value placed on `mesh`: adapters split over the model axis as `splits` and
    `lora_layout` say (SW-TP-1, SW-TP-5); a `Routed` bank as `shard_bank(mode=...)` and its ids
    over the data axis.

    Example:
        >>> shard_selection(None, make_mesh(data=1)) is None
        True
    """
    _check_layout(lora_layout)
    sel = as_selection(lora)
    if sel is None:
        return None
    if isinstance(sel, Routed):
        bank = shard_bank(
            sel.stacked,
            mesh,
            mode,
            axis=slot_axis,
            splits=splits,
            model_axis=model_axis,
            lora_layout=lora_layout,
        )
        return Routed(bank, put(sel.ids, batch_sharding(mesh, 1, axis=data_axis)))
    adapters = tuple(
        jax.tree.map(
            put,
            ad,
            adapter_sharding(
                ad,
                mesh,
                splits,
                axis=model_axis,
                lora_layout=lora_layout,
                name=f"active adapter #{i}",
            ),
        )
        for i, ad in enumerate(sel.adapters)
    )
    return Active(adapters, put(sel.gate, NamedSharding(mesh, PartitionSpec())))


def device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes each (addressable) device holds of the arrays in `tree` (SW-TP-2).

    Example:
        >>> sum(device_bytes({"w": jax.numpy.ones((4, 2))}).values())
        32
    """
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def to_host(x: Any) -> np.ndarray:
    """The whole value of an array as NumPy, on every process (SW-TP-4).

    `np.asarray(x)` when this process holds all of `x`; otherwise (a global array some of whose
    shards live on other processes' devices) the shards are gathered from every process first
    (`jax.experimental.multihost_utils.process_allgather`), which every process must call.

    Example:
        >>> to_host(jax.numpy.arange(3)).tolist()
        [0, 1, 2]
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
