"""Causal-LM batches and losses: prompt tokens masked out, per-adapter sums (spec SW-TRAIN-4).

A `Batch` holds right-padded token rows and a `loss_mask` that is 1 at every token the model
must predict (the completion; with plain text every token but the first) and 0 at prompt
tokens and padding. Position `t`'s logits predict token `t + 1`. Losses are sums of token
negative log-likelihoods with their token counts, grouped by adapter, so a mean is always per
adapter: adapters trained in one batch never share a normaliser (SW-TRAIN-5).

Example:
    >>> import jax.numpy as jnp
    >>> batch = make_batch([([1, 2], [3, 4])], length=5)
    >>> batch.tokens.tolist(), batch.loss_mask.tolist()
    ([[1, 2, 3, 4, 0]], [[0, 0, 1, 1, 0]])
    >>> logits = jnp.zeros((1, 5, 8))
    >>> round(float(lm_loss(logits, batch.tokens, batch.loss_mask)), 4)  # log(8)
    2.0794
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError, ShapeMismatchError

__all__ = ["Batch", "group_sums", "lm_loss", "make_batch", "token_nll"]

Array = jax.Array


class Batch(NamedTuple):
    """One training batch (a pytree).

    Arguments:
        tokens: `[B, T]` int token ids, right padded.
        loss_mask: `[B, T]`, 1 where the token is a target (predicted from the tokens before
            it), 0 at prompt tokens and padding.
        ids: `[B]` int slot ids (`jaxlora.train.make_slots_step`; `NO_ADAPTER` = -1: the row
            is ignored); None for one adapter.
        row_seeds: `[B]` int: row `i`'s dropout masks come from `fold_in(step_key,
            row_seeds[i])`, so they do not depend on where the row sits in the batch; default
            the row index.
    """

    tokens: Array
    loss_mask: Array
    ids: Array | None = None
    row_seeds: Array | None = None


def make_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    length: int,
    *,
    pad_id: int = 0,
    ids: Sequence[int] | None = None,
    row_seeds: Sequence[int] | None = None,
) -> Batch:
    """A `Batch` from `(prompt, completion)` token lists, right padded / truncated to `length`.

    The loss mask is 1 on the completion tokens. For plain text give `([], tokens)`: every
    token but the first is then a target (the first has nothing before it).

    Example:
        >>> make_batch([([], [5, 6, 7])], length=3).loss_mask.tolist()
        [[0, 1, 1]]
    """
    if length < 2:
        raise ConfigError(f"`length` must be at least 2 (one input, one target), got {length}.")
    tokens = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), np.int32)
    for i, (prompt, completion) in enumerate(examples):
        row = [*prompt, *completion][:length]
        tokens[i, : len(row)] = row
        mask[i, len(prompt) : len(row)] = 1
    mask[:, 0] = 0
    return Batch(
        jnp.asarray(tokens),
        jnp.asarray(mask),
        None if ids is None else jnp.asarray(np.asarray(ids, np.int32)),
        None if row_seeds is None else jnp.asarray(np.asarray(row_seeds, np.int32)),
    )


def token_nll(logits: Array, tokens: Array, loss_mask: Array) -> tuple[Array, Array]:
    """`(nll * weight, weight)`, both `[B, T - 1]` float32: each target's negative log-likelihood.

    `logits [B, T, V]` at position `t` predict `tokens[:, t + 1]`; `weight` is
    `loss_mask[:, 1:]`. The log-softmax is computed in float32.
    """
    if logits.shape[:2] != tokens.shape or tokens.shape != loss_mask.shape:
        raise ShapeMismatchError(
            f"logits {tuple(logits.shape)} must be [B, T, vocab] for tokens "
            f"{tuple(tokens.shape)} and loss_mask {tuple(loss_mask.shape)} [B, T]."
        )
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    weight = loss_mask[:, 1:].astype(jnp.float32)
    return nll * weight, weight


def lm_loss(logits: Array, tokens: Array, loss_mask: Array) -> Array:
    """The mean negative log-likelihood over the target tokens (0 when there are none)."""
    nll, weight = token_nll(logits, tokens, loss_mask)
    return nll.sum() / jnp.maximum(weight.sum(), 1.0)


def group_sums(
    logits: Array, tokens: Array, loss_mask: Array, ids: Array | None, groups: int
) -> tuple[Array, Array]:
    """`(sums [groups], counts [groups])`: summed target NLL and target count per adapter.

    `ids [B]` gives each row's group (-1: no group); None puts every row in group 0.
    """
    nll, weight = token_nll(logits, tokens, loss_mask)
    if ids is None:
        return nll.sum()[None], weight.sum()[None]
    onehot = jax.nn.one_hot(ids, groups, dtype=jnp.float32)  # id -1: an all-zero row
    return nll.sum(axis=1) @ onehot, weight.sum(axis=1) @ onehot
