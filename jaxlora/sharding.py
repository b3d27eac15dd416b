"""Place mixed batches and stacked banks on a `jax.sharding.Mesh` (spec SW-SHARD-1..3).

JAX's sharding is the engine: these helpers only build `NamedSharding`s with the right
`PartitionSpec`s and `device_put` values with them. A mesh has a data axis (default `"data"`)
for batch rows and optionally a slot axis (default `"slot"`) for the bank:

- the batch `x [B, ...]` and its ids `[B]` are split over `"data"` along rows;
- the bank is either replicated on every device (`mode="replicated"`: every device can route
  any row locally) or split over `"slot"` along its slot dimension (`mode="slot"`: each device
  group holds `S / n` slots; XLA inserts the collectives the routing kernel needs).

Then jit the forward with `out_shardings=batch_sharding(mesh, ...)` (or let propagation decide).

Multi-host: call `jax.distributed.initialize()` on every host before touching JAX, build the
mesh over `jax.devices()` (all hosts' devices), and give `shard_batch` each host's *local* rows:
when `jax.process_count() > 1` it assembles the global array with
`jax.make_array_from_process_local_data`. Every host must call the jitted forward with the same
shapes (SPMD). The bank is identical on every host, so `shard_bank` is unchanged.

Example:
    >>> import jax, jax.numpy as jnp
    >>> mesh = make_mesh(data=1)
    >>> x = shard_batch(jnp.ones((4, 3)), mesh)
    >>> x.sharding.spec
    P('data', None)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .types import StackedBank
from .errors import ConfigError, ShapeMismatchError

__all__ = [
    "bank_sharding",
    "batch_sharding",
    "make_mesh",
    "shard_bank",
    "shard_batch",
]

DATA = "data"
SLOT = "slot"


def make_mesh(data: int | None = None, slot: int = 1, *, devices: Any = None) -> Mesh:
    """A 2-D mesh `("data", "slot")` of `data * slot` devices (default: all devices on data).

    Example:
        >>> make_mesh(data=1, slot=1).axis_names
        ('data', 'slot')
    """
    devices = list(jax.devices() if devices is None else devices)
    if slot < 1:
        raise ConfigError(f"make_mesh: `slot` must be a positive device count, got {slot}.")
    if data is None:
        data = len(devices) // slot
    if data < 1 or data * slot > len(devices):
        raise ConfigError(
            f"a mesh of data={data} x slot={slot} devices needs {data * slot} devices; "
            f"{len(devices)} are available. Pick sizes whose product is <= {len(devices)}."
        )
    grid = np.asarray(devices[: data * slot], dtype=object).reshape(data, slot)
    return Mesh(grid, (DATA, SLOT))


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


def bank_sharding(stacked: StackedBank, mesh: Mesh, mode: str = "replicated", *, axis: str = SLOT):
    """The `NamedSharding` pytree for `stacked` (same structure), for `device_put` or jit.

    `mode="replicated"`: every array on every device. `mode="slot"`: dimension 0 (slots) split
    over `axis`; the slot count must be a multiple of the axis size.
    """
    if mode == "replicated":
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), stacked)
    if mode != "slot":
        raise ConfigError(f"unknown bank sharding mode {mode!r}; use 'replicated' or 'slot'.")
    size = _axis_size(mesh, axis)
    slots = len(stacked.names)
    if slots % size:
        raise ShapeMismatchError(
            f"the stacked bank has {slots} slots ({stacked.names}), not a multiple of mesh axis "
            f"{axis!r} of size {size}; stack a multiple of {size} adapters (e.g. repeat one "
            "under another name) or use mode='replicated'."
        )
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec(axis)), stacked)


def shard_bank(
    stacked: StackedBank, mesh: Mesh, mode: str = "replicated", *, axis: str = SLOT
) -> StackedBank:
    """`stacked` placed on `mesh`, replicated or split over the slot axis (SW-SHARD-2)."""
    return jax.device_put(stacked, bank_sharding(stacked, mesh, mode, axis=axis))
