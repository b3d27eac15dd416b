"""Write an adapter into an existing slot of a `StackedBank` without recompiling anything.

The analogue of PEFT's hotswap: the new adapter is padded to the bank's rank (zero columns of
`a`, zero rows of `b`, zeros for layers it does not target, as `conform` does), cast to the
bank's dtypes, and copied into slot `i` by one jitted update. Shapes, dtypes and the treedef of
the bank stay the same, so every jitted forward that took the old bank serves the new one
without retracing (spec SW-SLOT-1..3). Renaming a slot changes the bank's static `names` (and
so its treedef): to keep one compilation across renames, jit the forward over `stacked.weights`
and build ids on the host from the names. The slot index is a traced argument: writing any slot
reuses one compiled update per bank layout.

With `donate=True` (default) the old bank's buffers are donated to the update (XLA may write in
place); the old `StackedBank` is then consumed and must not be used again (its arrays raise
"deleted" errors). Pass `donate=False` to keep it (SW-BANK-3 immutability).

Example:
    >>> import jax, jaxlora
    >>> shapes = {"l0": (4, 4)}
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["l0"], init_lora_weights=False)
    >>> bank = jaxlora.AdapterBank().add("a", jaxlora.init_adapter(jax.random.key(0), cfg, shapes))
    >>> stacked = jaxlora.stack(bank.add("b", bank["a"]))
    >>> new = replace_slot(stacked, "b", jaxlora.init_adapter(jax.random.key(1), cfg, shapes),
    ...                    name="c")
    >>> new.names
    ('a', 'c')
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from .bank import check_adapter, pad_to_rank
from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    ShapeMismatchError,
    format_names,
)
from .lora import check_targets, check_weights
from .numerics import check_finite
from .types import Adapter, LoraWeights, StackedBank

__all__ = ["replace_slot", "slot_weights", "write_slot_weights"]


def _write(weights: dict[str, LoraWeights], index, new: dict[str, LoraWeights]):
    return jax.tree.map(
        lambda stacked, row: jax.lax.dynamic_update_index_in_dim(stacked, row, index, 0),
        weights,
        new,
    )


#: `write_slot_weights(weights, index, row)`: `weights` (a bank's `path -> LoraWeights`, its
#: buffers donated: consumed) with slot `index` (a traced int32: one executable per bank
#: layout) holding `row` (one slot's arrays, already padded and cast as `slot_weights` makes
#: them). The jitted write `replace_slot` uses, without its validation; for callers that
#: validated once (the engine's host store).
write_slot_weights = jax.jit(_write, donate_argnums=0)
_write_copy = jax.jit(_write)


def _resolve_slot(stacked: StackedBank, slot: int | str) -> int:
    if isinstance(slot, str):
        return stacked.slot(slot)
    if not isinstance(slot, int) or not 0 <= slot < len(stacked.names):
        raise AdapterNotFoundError(
            f"slot {slot!r} is not a slot index of this stacked bank (it has "
            f"{len(stacked.names)} slots: {format_names(stacked.names)}); pass an index in "
            f"[0, {len(stacked.names)}) or a slot name."
        )
    return slot


def slot_weights(stacked: StackedBank, adapter: Adapter, *, label: str = "adapter") -> dict:
    """`adapter` padded and cast to one slot of `stacked` (`a [in, R]`, `b [R, out]`, `scale`).

    Raises `TargetNotFoundError` for a layer the bank has no slot arrays for and
    `ShapeMismatchError` for a wrong `in`/`out` or a rank above the bank's.
    """
    if not isinstance(adapter, Mapping):
        raise ConfigError(f"{label}: expected a mapping `layer path -> LoraWeights`.")
    adapter = check_adapter("slot", adapter, label=label)  # shapes, dtypes, as AdapterBank does
    check_targets(set(adapter), stacked.weights, f"{label} (for a slot of the stacked bank)")
    row = {}
    for path, st in stacked.weights.items():
        _, d_in, rank = st.a.shape
        d_out = st.b.shape[-1]
        w = adapter.get(path)
        if w is None:
            row[path] = pad_to_rank(None, d_in, d_out, rank, st.a.dtype)
            continue
        check_weights(w, where=f"{label}, layer {path!r}", features=(d_in, d_out))
        if w.rank > rank:
            raise ShapeMismatchError(
                f"{label}, layer {path!r}: rank {w.rank} exceeds the bank's rank {rank}. "
                f"Rebuild the bank with jaxlora.stack(jaxlora.conform(bank, max_rank="
                f"{w.rank})) (one recompile), then replace slots freely."
            )
        row[path] = pad_to_rank(w, d_in, d_out, rank, st.a.dtype)
    return row


def replace_slot(
    stacked: StackedBank,
    slot: int | str,
    adapter: Adapter,
    *,
    name: str | None = None,
    donate: bool = True,
) -> StackedBank:
    """A bank whose slot `slot` holds `adapter`; other slots are unchanged (SW-SLOT-1..3).

    Arguments:
        stacked: the bank (from `jaxlora.stack`), possibly sharded (shardings are kept).
        slot: a slot index or the name of the adapter in that slot.
        adapter: `path -> LoraWeights` with rank <= the bank's; missing layers become zeros.
        name: the slot's new name (static metadata); default the old one.
        donate: donate the old bank's buffers (in-place update; the old bank is consumed).

    Returns:
        A new `StackedBank` with the same shapes, dtypes and treedef (no retrace downstream).
    """
    index = _resolve_slot(stacked, slot)
    old_name = stacked.names[index]
    new_name = old_name if name is None else name
    if not isinstance(new_name, str) or not new_name:
        raise ConfigError(f"slot names must be non-empty strings, got {new_name!r}.")
    if new_name != old_name and new_name in stacked.names:
        raise AdapterExistsError(
            f"cannot name slot {index} {new_name!r}: slot {stacked.names.index(new_name)} "
            f"already holds that name. Slots: {format_names(stacked.names)}."
        )
    check_finite(adapter, name=new_name)  # SW-NUM-3: a NaN slot would reach other rows
    row = slot_weights(stacked, adapter, label=f"adapter {new_name!r}")
    write = write_slot_weights if donate else _write_copy
    weights = write(stacked.weights, jnp.asarray(index, jnp.int32), row)
    names = (*stacked.names[:index], new_name, *stacked.names[index + 1 :])
    return StackedBank(weights, names)
