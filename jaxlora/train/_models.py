"""`logits_fn` for the model families: what the training steps call to run a forward.

Each returns an `LM(logits, base, shapes)`: `logits(base, tokens, lora)` is the model's forward
with the LoRA selection `lora=`, `base` the model's arrays (an argument of the jitted step, so
they are neither baked into the compiled step nor differentiated), `shapes` the layers an
adapter may target (`jaxlora.init_adapter`'s argument).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> lm = from_llama(Llama.random(LlamaConfig(32, 16, 32, 1, 2, 1, 8)))
    >>> lm.logits(lm.base, jnp.ones((1, 3), jnp.int32), None).shape
    (1, 3, 32)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
from flax import nnx

from ..flax import linen as lora_linen
from ..flax import nnx as lora_nnx
from ..models import Llama
from ..models import forward as llama_forward
from ..types import LoraSelection, Routing
from ._step import LogitsFn

__all__ = ["LM", "from_linen", "from_llama", "from_nnx"]

Array = jax.Array


class LM(NamedTuple):
    """A language model as the training steps see it.

    Arguments:
        logits: `logits(base, tokens [B, T], lora) -> [B, T, vocab]`.
        base: the base model's arrays (`nnx.State`, Linen variables, ...).
        shapes: `path -> (in, out)` of the adaptable layers.
    """

    logits: LogitsFn
    base: Any
    shapes: dict[str, tuple[int, int]]


def from_llama(model: Llama, *, routing: Routing = "auto") -> LM:
    """The `jaxlora.models.Llama` family (`jaxlora.models.forward`), HF module paths."""
    graphdef, state = nnx.split(model)

    def logits(base: Any, tokens: Array, lora: LoraSelection) -> Array:
        return llama_forward(nnx.merge(graphdef, base), tokens, lora=lora, routing=routing)

    return LM(logits, state, model.lora_shapes())


def from_nnx(model: nnx.Module, *, routing: Routing = "auto") -> LM:
    """An unmodified NNX model `model(tokens) -> logits` (`jaxlora.flax.nnx.with_lora`; state
    the call would update, such as BatchNorm statistics, is not written back)."""
    graphdef, state = nnx.split(model)

    def logits(base: Any, tokens: Array, lora: LoraSelection) -> Array:
        adapted = lora_nnx.with_lora(nnx.merge(graphdef, base), lora, routing=routing)
        return adapted(tokens)

    return LM(logits, state, lora_nnx.layer_shapes(model))


def from_linen(
    module: nn.Module, variables: Any, example: Array, *, routing: Routing = "auto"
) -> LM:
    """An unmodified Linen model `module.apply(variables, tokens) -> logits`
    (`jaxlora.flax.linen.apply`); `example` is a token batch its layer shapes are read from."""

    def logits(base: Any, tokens: Array, lora: LoraSelection) -> Array:
        return lora_linen.apply(module, base, tokens, lora=lora, routing=routing)

    return LM(logits, variables, lora_linen.layer_shapes(module, example))
