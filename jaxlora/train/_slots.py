"""Training many adapters in one step: each row of a mixed batch on its own slot (SW-TRAIN-5).

The adapters are the slots of a `StackedBank` (`jaxlora.stack(jaxlora.conform(bank))`). A
batch's `ids` say which slot each row belongs to; one jitted step computes, per slot, the mean
loss over that slot's target tokens only (per-adapter normalisation: adapters never interact),
the gradients (a slot's factors reach only its own rows), and one optimizer update per slot
with the optimizer mapped over the slot axis (`jax.vmap(optimizer.update)`): every slot has
its own optimizer state, step count and learning-rate factor, exactly as if it were trained
alone. A slot with no target tokens in the batch, or not in the training set, takes no step
(state and factors unchanged), as alone it would not have run.

The slot count and shapes are the only static things: `set_slot` writes a new adapter (and a
fresh optimizer state) into a slot and `set_training` moves a slot in or out of the training
set, neither recompiling the step (SW-TRAIN-5).

Example:
    >>> import jax, optax, jaxlora
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora import train
    >>> lm = train.from_llama(Llama.random(LlamaConfig(32, 16, 32, 1, 2, 1, 8)))
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["v_proj"])
    >>> bank = jaxlora.AdapterBank({n: jaxlora.init_adapter(jax.random.key(i), cfg, lm.shapes)
    ...                             for i, n in enumerate(["a", "b"])})
    >>> opt = optax.adam(1e-2)
    >>> state = train.init_slots(opt, jaxlora.stack(bank))
    >>> step = train.make_slots_step(opt, lm.logits)
    >>> batch = train.make_batch([([1], [2, 3]), ([4], [5, 6])], length=4, ids=[0, 1])
    >>> state, metrics = step(state, lm.base, batch, jax.random.key(0))
    >>> state.steps.tolist(), metrics["loss"].shape
    ([1, 1], (2,))
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import AdapterNotFoundError, ConfigError, ShapeMismatchError
from ..slots import slot_weights
from ..types import Adapter, LoraWeights, Routed, StackedBank
from ._loss import Batch
from ._split import join, split
from ._step import LogitsFn, _check_options, accumulated_grads, check_batch, lm_objective

__all__ = [
    "SlotsState",
    "init_slots",
    "make_slots_step",
    "set_slot",
    "set_training",
    "stacked_of",
]

Array = jax.Array


class SlotsState(NamedTuple):
    """The state of training the slots of a stacked bank (a pytree; every leaf has a leading
    slot axis `S`).

    Arguments:
        trainable: `path -> LoraWeights(a [S, in, R], b [S, R, out], None)`.
        frozen: `path -> LoraWeights(None, None, scale [S])`.
        opt_state: the optimizer's state, one per slot.
        training: `[S]` bool, the slots that learn.
        lr_scale: `[S]` float32, each slot's learning-rate factor (its updates are multiplied
            by it: exact per-adapter learning rates for optimizers whose update is linear in
            the learning rate, e.g. sgd, adam, adamw).
        steps: `[S]` int32, the updates each slot has taken.
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    training: Array
    lr_scale: Array
    steps: Array

    @property
    def slots(self) -> int:
        return int(self.training.shape[0])


def _mask(value: Any, names: tuple[str, ...], what: str, default: Any, dtype: Any) -> Array:
    """A `[S]` array from None (the default), a per-slot sequence, or `name -> value`."""
    if value is None:
        return jnp.full((len(names),), default, dtype)
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise AdapterNotFoundError(
                f"{what} names {unknown}, which are not slots of the stacked bank {names}."
            )
        return jnp.asarray([value.get(n, default) for n in names], dtype)
    arr = np.asarray(value, dtype)
    if arr.shape != (len(names),):
        raise ShapeMismatchError(
            f"{what} needs one value per slot ({len(names)}), got shape {arr.shape}."
        )
    return jnp.asarray(arr)


def init_slots(
    optimizer: optax.GradientTransformation,
    stacked: StackedBank,
    *,
    training: Sequence[bool] | dict[str, bool] | None = None,
    lr_scale: Sequence[float] | dict[str, float] | None = None,
) -> SlotsState:
    """The initial `SlotsState` of every slot of `stacked`.

    Arguments:
        optimizer: the optimizer every slot uses (its state is mapped over the slots).
        stacked: `jaxlora.stack(jaxlora.conform(bank))`.
        training: which slots learn (per slot, or `name -> bool`); default all.
        lr_scale: per-slot learning-rate factors (per slot, or `name -> factor`); default 1.
    """
    if not isinstance(stacked, StackedBank) or not stacked.names:
        raise ConfigError(
            "init_slots takes a non-empty StackedBank: jaxlora.stack(jaxlora.conform(bank))."
        )
    # Copies: the step donates its state, which must not delete the caller's stacked bank.
    trainable, frozen = jax.tree.map(jnp.copy, split(dict(stacked.weights)))
    names = stacked.names
    return SlotsState(
        trainable,
        frozen,
        jax.vmap(optimizer.init)(trainable),
        _mask(training, names, "training", True, bool),
        _mask(lr_scale, names, "lr_scale", 1.0, jnp.float32),
        jnp.zeros((len(names),), jnp.int32),
    )


def _placeholder_names(slots: int) -> tuple[str, ...]:
    return tuple(f"slot{i}" for i in range(slots))


def stacked_of(state: SlotsState, names: Sequence[str]) -> StackedBank:
    """The `StackedBank` a `SlotsState` holds, slot `i` named `names[i]` (scales unchanged)."""
    names = tuple(names)
    if len(names) != state.slots:
        raise ShapeMismatchError(
            f"stacked_of: the state has {state.slots} slots but {len(names)} names were given."
        )
    return StackedBank(join(state.trainable, state.frozen), names)


def _per_slot(mask: Array, new: Any, old: Any) -> Any:
    def pick(n: Array, o: Array) -> Array:
        return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def make_slots_step(
    optimizer: optax.GradientTransformation,
    logits_fn: LogitsFn,
    *,
    dropout: float = 0.0,
    accumulate: int = 1,
    donate: bool = True,
) -> Callable[[SlotsState, Any, Batch, Array], tuple[SlotsState, dict[str, Array]]]:
    """One jitted step that trains every slot on its own rows (spec SW-TRAIN-5).

    Arguments:
        optimizer: any optax optimizer, applied to each slot separately.
        logits_fn: `logits_fn(base, tokens, lora) -> logits`; `lora` is a `Routed` batch.
        dropout: PEFT's `lora_dropout` in training (0: none); row `i`'s masks come from
            `fold_in(key, batch.row_seeds[i])`.
        accumulate: micro-batches per update (the batch's rows are split evenly).
        donate: donate the input state's buffers.

    Returns:
        `step(state, base, batch, key) -> (state, {"loss": [S], "tokens": [S]})`: each slot's
        mean loss over its target tokens, and their number. `batch.ids` is required.
    """
    _check_options(dropout, accumulate)

    def step(state: SlotsState, base: Any, batch: Batch, key: Array):
        check_batch(batch, accumulate, need_ids=True)
        slots = state.slots
        names = _placeholder_names(slots)  # static: depends on the slot count only

        def routed(weights: dict[str, LoraWeights], b: Batch) -> Routed:
            assert b.ids is not None  # check_batch(need_ids=True)
            return Routed(StackedBank(weights, names), b.ids)

        objective = lm_objective(logits_fn, routed, dropout, slots)
        grads, sums, counts = accumulated_grads(
            objective, state, base, batch, key, accumulate, slots
        )
        updates, opt_state = jax.vmap(optimizer.update)(grads, state.opt_state, state.trainable)
        updates = jax.tree.map(
            lambda u: u * state.lr_scale.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype),
            updates,
        )
        trainable = optax.apply_updates(state.trainable, updates)
        stepped = state.training & (counts > 0)
        new = state._replace(
            trainable=_per_slot(stepped, trainable, state.trainable),
            opt_state=_per_slot(stepped, opt_state, state.opt_state),
            steps=state.steps + stepped.astype(jnp.int32),
        )
        return new, {"loss": sums / jnp.maximum(counts, 1.0), "tokens": counts}

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _write(tree: Any, index: Array, row: Any) -> Any:
    return jax.tree.map(
        lambda stacked, r: jax.lax.dynamic_update_index_in_dim(
            stacked, jnp.asarray(r, stacked.dtype), index, 0
        ),
        tree,
        row,
    )


@functools.partial(jax.jit, static_argnames=("optimizer",), donate_argnames=("state",))
def _set_slot_donated(state, index, trow, frow, lr_scale, training, *, optimizer):
    return _set_slot_impl(state, index, trow, frow, lr_scale, training, optimizer)


@functools.partial(jax.jit, static_argnames=("optimizer",))
def _set_slot_copy(state, index, trow, frow, lr_scale, training, *, optimizer):
    return _set_slot_impl(state, index, trow, frow, lr_scale, training, optimizer)


def _set_slot_impl(state, index, trow, frow, lr_scale, training, optimizer):
    return SlotsState(
        _write(state.trainable, index, trow),
        _write(state.frozen, index, frow),
        _write(state.opt_state, index, optimizer.init(trow)),
        state.training.at[index].set(training),
        state.lr_scale.at[index].set(lr_scale),
        state.steps.at[index].set(0),
    )


def _index(state: SlotsState, slot: int) -> Array:
    if not isinstance(slot, int | np.integer) or not 0 <= slot < state.slots:
        raise AdapterNotFoundError(
            f"slot {slot!r} is not a slot index of this state (it has {state.slots} slots); "
            f"pass an index in [0, {state.slots})."
        )
    return jnp.asarray(slot, jnp.int32)


def set_slot(
    state: SlotsState,
    optimizer: optax.GradientTransformation,
    slot: int,
    adapter: Adapter,
    *,
    lr_scale: float = 1.0,
    training: bool = True,
    donate: bool = True,
) -> SlotsState:
    """`state` with `adapter` in slot `slot`, a fresh optimizer state and step count 0: an
    adapter joins the training set (SW-TRAIN-5). No step recompiles (same shapes).

    `adapter` is padded to the bank's rank and targets as `jaxlora.replace_slot` does (rank at
    most the bank's). With `donate`, the old state is consumed.
    """
    index = _index(state, slot)
    names = _placeholder_names(state.slots)
    row = slot_weights(stacked_of(state, names), adapter, label=f"adapter for slot {slot}")
    trow, frow = split(row)
    write = _set_slot_donated if donate else _set_slot_copy
    return write(
        state,
        index,
        trow,
        frow,
        jnp.asarray(lr_scale, jnp.float32),
        jnp.asarray(training, bool),
        optimizer=optimizer,
    )


def set_training(state: SlotsState, slot: int, training: bool) -> SlotsState:
    """`state` with slot `slot` in (`True`) or out of (`False`) the training set; a slot out of
    it keeps its factors and optimizer state untouched. No step recompiles."""
    index = _index(state, slot)
    return state._replace(training=state.training.at[index].set(bool(training)))
