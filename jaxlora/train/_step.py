"""Training one adapter: `init` and `make_step`, an optax optimizer over the trainable split.

`make_step(optimizer, logits_fn)` returns one jitted step `step(state, base, batch, key) ->
(state, metrics)`: the causal-LM loss of `batch` (prompt tokens masked, mean over its target
tokens), gradients of the factors only (the base model is an argument that is never
differentiated: no gradient buffers for it), `accumulate` micro-batches summed before one
optimizer update, and PEFT's dropout on the LoRA input when `dropout > 0`. `logits_fn(base,
tokens, lora)` is any model's forward (`jaxlora.train.from_llama`, `from_linen`, `from_nnx`).

Gradient accumulation sums each micro-batch's *summed* token losses and divides by the total
target count once, so `accumulate=k` equals one batch of all the rows (up to float summation
order) whatever the number of targets per micro-batch (SW-TRAIN-4).

Example:
    >>> import jax, jax.numpy as jnp, optax, jaxlora
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora import train
    >>> lm = train.from_llama(Llama.random(LlamaConfig(32, 16, 32, 1, 2, 1, 8)))
    >>> cfg = jaxlora.LoraConfig(r=2, target_modules=["v_proj"])
    >>> opt = optax.adam(1e-2)
    >>> state = train.init(opt, jaxlora.init_adapter(jax.random.key(0), cfg, lm.shapes))
    >>> step = train.make_step(opt, lm.logits)
    >>> batch = train.make_batch([([1, 2], [3, 4, 5])], length=6)
    >>> state, metrics = step(state, lm.base, batch, jax.random.key(1))
    >>> int(state.step), metrics["loss"].shape
    (1, ())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import ConfigError, ShapeMismatchError
from ..types import Active, Adapter, LoraSelection, LoraWeights
from ._loss import Batch, group_sums
from ._split import dropout as with_dropout
from ._split import join, split

__all__ = ["LogitsFn", "TrainState", "adapter_of", "init", "make_step"]

Array = jax.Array

#: `logits_fn(base, tokens [B, T], lora) -> logits [B, T, vocab]`: a model's forward.
LogitsFn = Callable[[Any, Array, LoraSelection], Array]

#: `objective(trainable, frozen, base, batch, key) -> (sums [G], counts [G])`.
Objective = Callable[[Any, Any, Any, Batch, Array], tuple[Array, Array]]


class TrainState(NamedTuple):
    """The state of training one adapter (a pytree).

    Arguments:
        trainable: the adapter's factors (`split(adapter)[0]`), what the optimizer updates.
        frozen: its scales (`split(adapter)[1]`), never updated.
        opt_state: the optimizer's state for `trainable`.
        step: int32, the optimizer updates taken.
    """

    trainable: Any
    frozen: Any
    opt_state: Any
    step: Array


def init(optimizer: optax.GradientTransformation, adapter: Adapter) -> TrainState:
    """The initial `TrainState` of `adapter` (from `jaxlora.init_adapter`, a file, ...); the
    state holds copies, so `adapter` stays valid when a step donates the state."""
    # Copies: the step donates its state, which must not delete the caller's adapter.
    trainable, frozen = jax.tree.map(jnp.copy, split(dict(adapter)))
    return TrainState(trainable, frozen, optimizer.init(trainable), jnp.zeros((), jnp.int32))


def adapter_of(state: TrainState) -> dict[str, LoraWeights]:
    """The adapter a `TrainState` holds: `join(state.trainable, state.frozen)`."""
    return join(state.trainable, state.frozen)


def check_batch(batch: Batch, accumulate: int, *, need_ids: bool) -> None:
    """Static checks of a batch against the step's options (run while tracing)."""
    if not isinstance(batch, Batch):
        raise ConfigError(
            f"the step takes a jaxlora.train.Batch (tokens, loss_mask, ...), got "
            f"{type(batch).__name__}; build one with jaxlora.train.make_batch."
        )
    rows = batch.tokens.shape[0]
    if batch.tokens.ndim != 2 or batch.loss_mask.shape != batch.tokens.shape:
        raise ShapeMismatchError(
            f"batch.tokens {tuple(batch.tokens.shape)} and batch.loss_mask "
            f"{tuple(batch.loss_mask.shape)} must both be [rows, length]."
        )
    if rows % accumulate:
        raise ShapeMismatchError(
            f"the batch has {rows} rows, which accumulate={accumulate} micro-batches cannot "
            "split evenly; give a multiple of `accumulate` rows."
        )
    if need_ids and batch.ids is None:
        raise ConfigError(
            "a slots step needs batch.ids (one slot per row, -1 for none); pass ids= to "
            "jaxlora.train.make_batch."
        )
    for name in ("ids", "row_seeds"):
        value = getattr(batch, name)
        if value is not None and tuple(value.shape) != (rows,):
            raise ShapeMismatchError(
                f"batch.{name} has shape {tuple(value.shape)}; it needs one value per row "
                f"({rows},)."
            )


def row_keys(key: Array, batch: Batch) -> Array:
    """One dropout key per row: `fold_in(key, row_seeds[i])` (default seed: the row index)."""
    seeds = batch.row_seeds
    if seeds is None:
        seeds = jnp.arange(batch.tokens.shape[0], dtype=jnp.int32)
    return jax.vmap(lambda s: jax.random.fold_in(key, s))(seeds)


def accumulated_grads(
    objective: Objective,
    state: Any,
    base: Any,
    batch: Batch,
    key: Array,
    accumulate: int,
    groups: int,
) -> tuple[Any, Array, Array]:
    """`(grads, sums, counts)` over `accumulate` micro-batches: gradients of the summed losses
    divided by each group's total target count, and the per-group sums / counts."""
    keys = row_keys(key, batch)
    batch = batch._replace(row_seeds=None)

    def split_micro(x: Array) -> Array:
        return x.reshape((accumulate, x.shape[0] // accumulate, *x.shape[1:]))

    micro = jax.tree.map(split_micro, (batch, keys))

    def total(trainable: Any, mb: Batch, mk: Array) -> tuple[Array, tuple[Array, Array]]:
        sums, counts = objective(trainable, state.frozen, base, mb, mk)
        return sums.sum(), (sums, counts)

    grad_fn = jax.grad(total, has_aux=True)

    def body(carry, xs):
        grads, sums, counts = carry
        g, (s, c) = grad_fn(state.trainable, *xs)
        return (jax.tree.map(jnp.add, grads, g), sums + s, counts + c), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    init_carry = (zeros, jnp.zeros((groups,), jnp.float32), jnp.zeros((groups,), jnp.float32))
    (grads, sums, counts), _ = jax.lax.scan(body, init_carry, micro)
    denom = jnp.maximum(counts, 1.0)
    if counts.shape == (1,):
        grads = jax.tree.map(lambda g: g / denom[0].astype(g.dtype), grads)
    else:
        grads = jax.tree.map(
            lambda g: g / denom.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads
        )
    return grads, sums, counts


def lm_objective(logits_fn: LogitsFn, make_lora: Callable, rate: float, groups: int) -> Objective:
    """The causal-LM objective of `logits_fn` for the selection `make_lora(weights, batch)`."""

    def objective(trainable, frozen, base, batch, keys):
        lora = make_lora(join(trainable, frozen), batch)
        if rate > 0:
            lora = with_dropout(lora, keys, rate)
        logits = logits_fn(base, batch.tokens, lora)
        return group_sums(logits, batch.tokens, batch.loss_mask, batch.ids, groups)

    return objective


def _check_options(dropout: float, accumulate: int) -> None:
    if not isinstance(accumulate, int) or isinstance(accumulate, bool) or accumulate < 1:
        raise ConfigError(f"`accumulate` must be a positive int, got {accumulate!r}.")
    if not 0 <= dropout < 1:
        raise ConfigError(f"`dropout` must be a probability in [0, 1), got {dropout!r}.")


def make_step(
    optimizer: optax.GradientTransformation,
    logits_fn: LogitsFn,
    *,
    dropout: float = 0.0,
    accumulate: int = 1,
    donate: bool = True,
) -> Callable[[TrainState, Any, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """One jitted training step of one adapter (spec SW-TRAIN-1, SW-TRAIN-3, SW-TRAIN-4).

    Arguments:
        optimizer: any optax optimizer; it sees only the factors (`split`).
        logits_fn: `logits_fn(base, tokens, lora) -> logits` (see `jaxlora.train.from_llama`).
        dropout: PEFT's `lora_dropout` in training (0: none).
        accumulate: micro-batches per optimizer update (the batch's rows are split evenly).
        donate: donate the input state's buffers (the old state must not be used again).

    Returns:
        `step(state, base, batch, key) -> (state, {"loss": mean target NLL, "tokens": count})`.
        A batch without target tokens leaves the state unchanged.
    """
    _check_options(dropout, accumulate)
    objective = lm_objective(logits_fn, lambda w, _: Active.of(w), dropout, 1)

    def step(state: TrainState, base: Any, batch: Batch, key: Array):
        check_batch(batch, accumulate, need_ids=False)
        batch = batch._replace(ids=None)
        grads, sums, counts = accumulated_grads(objective, state, base, batch, key, accumulate, 1)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        stepped = counts[0] > 0
        new = TrainState(trainable, state.frozen, opt_state, state.step + 1)
        new = jax.tree.map(lambda n, o: jnp.where(stepped, n, o), new, state)
        return new, {"loss": sums[0] / jnp.maximum(counts[0], 1.0), "tokens": counts[0]}

    return jax.jit(step, donate_argnums=(0,) if donate else ())
