"""Adapters beyond the device: a host store of any number, N device slots run as an LRU cache.

`AdapterStore` holds every loaded adapter on the host, validated and padded to the slot layout
(rank, targets, dtype) once, when it is added. `SlotCache` is the bookkeeping of the N device
slots (spec SW-ENGINE-7):

- a request whose adapter is resident is a *hit*; otherwise a *miss*, and the adapter is
  written into a free slot, else into the least recently used slot that no live row uses, by
  `jaxlora.replace_slot` (donated, no recompile: the slot index is data);
- a slot is *pinned* while a row that uses it is live: it is never evicted and never written,
  so a swap-in never changes the adapter of a running request;
- removing an adapter from the store stops new hits at once; its slot is freed when the last
  row using it ends.

Keys are `(name, version)`: loading a name again after removing it is a new version, so a row
admitted before the reload keeps the weights it started with.

Example:
    >>> cache = SlotCache(2)
    >>> cache.lookup(("a", 0)) is None, cache.victim()
    (True, 0)
    >>> cache.install(("a", 0), 0); cache.pin(0); cache.lookup(("a", 0))
    0
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, format_names
from ..numerics import check_finite
from ..slots import slot_weights, write_slot_weights
from ..types import Adapter, LoraWeights, StackedBank

__all__ = ["AdapterStore", "SlotCache", "SlotStats", "empty_bank", "swap_in", "write_slot"]

Key = Any  # hashable: `(name, version)` in the engine


@dataclasses.dataclass(frozen=True)
class _Entry:
    version: int
    row: dict[str, LoraWeights]
    source: str | None


class AdapterStore:
    """Host-side adapters by name, each already padded to one slot of `template` (thread-safe).

    Arguments:
        template: a `StackedBank` with the device slots' layout (only shapes are read).
        max_adapters: the most adapters held (None: no limit).
    """

    def __init__(self, template: StackedBank, max_adapters: int | None = None):
        self._template = template
        self.max_adapters = max_adapters
        self._entries: dict[str, _Entry] = {}
        self._versions = 0
        self._lock = threading.Lock()

    def add(self, name: str, adapter: Adapter, source: str | None = None) -> int:
        """Validate and store `adapter` as `name`; returns its version (raises, storing nothing,
        for a taken name, a full store, a layer the slots lack, a rank above theirs, NaN/Inf)."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter names must be non-empty strings, got {name!r}.")
        check_finite(adapter, name=name)
        row = slot_weights(self._template, adapter, label=f"adapter {name!r}")
        row = jax.tree.map(np.asarray, row)  # host memory; moved to a device slot on demand
        with self._lock:
            if name in self._entries:
                raise AdapterExistsError(
                    f"adapter {name!r} is already loaded; remove (unload) it first to replace it."
                )
            if self.max_adapters is not None and len(self._entries) >= self.max_adapters:
                raise AdapterExistsError(
                    f"cannot load {name!r}: the store holds its limit of {self.max_adapters} "
                    "adapters; unload one first or raise the limit."
                )
            self._versions += 1
            self._entries[name] = _Entry(self._versions, row, source)
            return self._versions

    def remove(self, name: str) -> int:
        """Forget `name` (rows using it finish with it); returns its version."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            raise AdapterNotFoundError(
                f"no adapter named {name!r} is loaded. Loaded: {format_names(self.names())}."
            )
        return entry.version

    def get(self, name: str) -> tuple[int, dict[str, LoraWeights]] | None:
        """`(version, padded row)` of `name`, or None when it is not loaded."""
        with self._lock:
            entry = self._entries.get(name)
        return None if entry is None else (entry.version, entry.row)

    def version(self, name: str) -> int | None:
        with self._lock:
            entry = self._entries.get(name)
        return None if entry is None else entry.version

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def info(self) -> dict[str, dict[str, Any]]:
        """`name -> {"version", "source"}`."""
        with self._lock:
            return {n: {"version": e.version, "source": e.source} for n, e in self._entries.items()}

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


@dataclasses.dataclass
class SlotStats:
    """Device-slot counters: lookups that hit / missed, swap-ins, evictions, swap-in seconds."""

    hits: int = 0
    misses: int = 0
    swap_ins: int = 0
    evictions: int = 0
    swap_in_seconds: float = 0.0


class SlotCache:
    """Which adapter key each of `slots` device slots holds, pins, and LRU order.

    Used by the engine thread only. `fixed` keys (a caller's stacked bank) occupy slots
    `0..len(fixed) - 1` for good: never evicted.
    """

    def __init__(self, slots: int, fixed: Sequence[Key] = ()):
        self.owner: list[Key | None] = [None] * slots
        self.pins = [0] * slots
        self.resident: dict[Key, int] = {}
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._fixed = set(range(len(fixed)))
        self.stats = SlotStats()
        for i, key in enumerate(fixed):
            self.owner[i] = key
            self.resident.setdefault(key, i)

    def lookup(self, key: Key) -> int | None:
        """The slot holding `key`, or None (counts a hit or a miss)."""
        slot = self.resident.get(key)
        if slot is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return slot

    def victim(self) -> int | None:
        """A slot to write: a free one, else the least recently used unpinned one, else None."""
        for slot, key in enumerate(self.owner):
            if key is None:
                return slot
        return next(iter(self._lru), None)

    def install(self, key: Key, slot: int) -> None:
        """Record that `slot` now holds `key` (after the engine wrote it)."""
        if self.pins[slot] or slot in self._fixed:
            raise RuntimeError(f"slot {slot} is pinned or fixed; it cannot be replaced")
        old = self.owner[slot]
        if old is not None:
            self.stats.evictions += 1
            if self.resident.get(old) == slot:
                del self.resident[old]
        self.owner[slot] = key
        self.resident[key] = slot
        self._lru.pop(slot, None)
        self._lru[slot] = None

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self._lru.pop(slot, None)

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and slot not in self._fixed:
            if self.owner[slot] is not None and self.resident.get(self.owner[slot]) != slot:
                self.owner[slot] = None  # its adapter was removed while in use: free it now
            else:
                self._lru[slot] = None  # most recently used

    def drop(self, key: Key) -> None:
        """`key` was removed from the store: no more hits; free its slot when unpinned."""
        slot = self.resident.pop(key, None)
        if slot is not None and self.pins[slot] == 0 and slot not in self._fixed:
            self.owner[slot] = None
            self._lru.pop(slot, None)

    def pinned(self) -> dict[int, int]:
        """`slot -> live rows` for the slots in use."""
        return {s: n for s, n in enumerate(self.pins) if n}


def write_slot(stacked: StackedBank, slot: int, row: Mapping[str, LoraWeights]) -> StackedBank:
    """`stacked` with slot `slot` holding `row` (already padded by `AdapterStore.add`).

    The donated, jitted slot write of `jaxlora.replace_slot` (the slot index is data: one
    executable for every slot), without its per-call validation and padding: the store did
    both once, when the adapter was added. `stacked` is consumed.
    """
    weights = write_slot_weights(stacked.weights, np.int32(slot), dict(row))
    return StackedBank(weights, stacked.names)


def swap_in(
    slots: SlotCache, store: AdapterStore, bank: StackedBank, key: tuple[str, int], slot: int
) -> StackedBank:
    """Write the stored adapter `key = (name, version)` into `slot` of `bank` (consumed) and
    record it in `slots`, timing it; raises `AdapterNotFoundError` if that version is gone."""
    entry = store.get(key[0])
    if entry is None or entry[0] != key[1]:
        raise AdapterNotFoundError(f"adapter {key[0]!r} was unloaded before the request ran.")
    start = time.perf_counter()
    bank = write_slot(bank, slot, entry[1])
    jax.block_until_ready(bank.weights)
    slots.install(key, slot)
    slots.stats.swap_ins += 1
    slots.stats.swap_in_seconds += time.perf_counter() - start
    return bank


def empty_bank(
    model_shapes: Mapping[str, tuple[int, int]],
    slots: int,
    rank: int,
    targets: Sequence[str],
    dtype: Any,
) -> StackedBank:
    """A `StackedBank` of `slots` all-zero slots named `slot0..`, rank `rank`, on `targets`."""
    import jax.numpy as jnp

    unknown = sorted(set(targets) - set(model_shapes))
    if unknown or not targets:
        raise ConfigError(
            f"engine targets must be projections of the model; unknown: {format_names(unknown)}; "
            f"projections: {format_names(sorted(model_shapes), 8)}."
        )
    weights = {
        path: LoraWeights(
            jnp.zeros((slots, model_shapes[path][0], rank), dtype),
            jnp.zeros((slots, rank, model_shapes[path][1]), dtype),
            jnp.zeros((slots,), jnp.float32),
        )
        for path in sorted(targets)
    }
    return StackedBank(weights, tuple(f"slot{i}" for i in range(slots)))
