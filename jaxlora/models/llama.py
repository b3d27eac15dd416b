"""A Llama-family decoder in Flax NNX whose projections take the LoRA selection as an argument.

Every projection is a `Linear` that knows its Hugging Face module path (`lora_path`:
`model.layers.0.self_attn.q_proj`), so adapters trained with PEFT on the `transformers` model
apply without a key map. The LoRA selection is an ordinary argument of the forward, never state:
`lora=` takes what every jaxlora integration takes (`jaxlora.select(...)`, one adapter,
`stacked.route(names)` for a batch whose rows use different adapters, or None) and `routing=`
the mixed-batch kernel (spec SW-LLAMA-3, SW-LLAMA-4). The KV cache is an explicit `KVCache`
pytree passed in and returned, so the decode step is a pure function that jit compiles once.

The model uses the seam beneath `jaxlora.flax.nnx` rather than `jaxlora.flax.nnx.apply`:
each `Linear` calls `jaxlora.lora.lora_dense` with the selection threaded through the forward
as an argument, so a jitted step takes the selection as an input (no model copy or module
patching per call, and the decode loop can carry it) while the per-layer arithmetic and the
validation are the same functions every other integration calls.

Example:
    >>> import jax.numpy as jnp
    >>> from jaxlora.models import LlamaConfig, Llama
    >>> cfg = LlamaConfig(64, 16, 32, 2, 4, 2, 4)
    >>> model = Llama.random(cfg, seed=0)
    >>> logits = forward(model, jnp.asarray([[1, 2, 3]]))
    >>> logits.shape
    (1, 3, 64)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import ShapeMismatchError
from ..lora import check_selection, lora_dense
from ..types import Active, LoraSelection, Routed, Routing
from .config import LlamaConfig, rope_inv_freq

__all__ = ["KVCache", "Linear", "Llama", "forward", "forward_with_cache", "init_cache"]

Array = jax.Array

#: The projections of one decoder layer, as HF names them (the LoRA targets).
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


#: The canonical selection inside the model (`jaxlora.lora.as_selection`).
Lora = Active | Routed | None


class KVCache(NamedTuple):
    """Preallocated keys/values for decoding (a pytree).

    Arguments:
        k, v: `[layers, batch, max_len, kv_heads, head_dim]`.
        valid: `[batch, max_len]` bool, which cache slots hold a real (non-padding) token.
        index: int32 scalar, the next slot to write (the same for every row: left padding).
        next_pos: `[batch]` int32, the RoPE position of each row's next real token.
    """

    k: Array
    v: Array
    valid: Array
    index: Array
    next_pos: Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    """An empty cache for `batch` rows of at most `max_len` tokens (prompt + generated)."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((batch, max_len), bool),
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch,), jnp.int32),
    )


class Linear(nnx.Module):
    """A dense projection `x @ kernel (+ bias)` plus the LoRA deltas of its path.

    Arguments:
        kernel: `[in, out]` (transposed from HF's `[out, in]` `weight`).
        bias: `[out]` or None.
        lora_path: the HF module path, the key adapters use (`jaxlora.merge` reads it too).
    """

    def __init__(self, kernel: Array, bias: Array | None, lora_path: str):
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(bias)
        self.lora_path = lora_path

    def __call__(self, x: Array, lora: Lora, routing: Routing = "auto") -> Array:
        bias = None if self.bias is None else self.bias[...]
        return lora_dense(x, self.kernel[...], bias, lora, self.lora_path, routing=routing)


class RMSNorm(nnx.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, the statistics in float32 (as transformers)."""

    def __init__(self, weight: Array, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class Block(nnx.Module):
    """One decoder layer: pre-norm GQA attention and a pre-norm SwiGLU MLP, both residual."""

    def __init__(self, config: LlamaConfig, t: dict[str, Array], i: int):
        p = f"model.layers.{i}."
        lin = {
            name: Linear(t[p + name + ".kernel"], t.get(p + name + ".bias"), p + name)
            for name in PROJECTIONS
        }
        self.q_proj, self.k_proj = lin["self_attn.q_proj"], lin["self_attn.k_proj"]
        self.v_proj, self.o_proj = lin["self_attn.v_proj"], lin["self_attn.o_proj"]
        self.gate_proj, self.up_proj = lin["mlp.gate_proj"], lin["mlp.up_proj"]
        self.down_proj = lin["mlp.down_proj"]
        self.input_layernorm = RMSNorm(t[p + "input_layernorm.weight"], config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(
            t[p + "post_attention_layernorm.weight"], config.rms_norm_eps
        )
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim

    def __call__(self, x, cos, sin, mask, k_cache, v_cache, index, lora, routing):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h, lora, routing).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(h, lora, routing).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(h, lora, routing).reshape(b, t, self.kv_heads, self.head_dim)
        q = _rotate(q, cos[:, :, None, :], sin[:, :, None, :])
        k = _rotate(k, cos[:, :, None, :], sin[:, :, None, :])
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        group = self.heads // self.kv_heads
        qg = q.reshape(b, t, self.kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype))
        scores = scores.astype(jnp.float32) * (self.head_dim**-0.5)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        attn = jnp.einsum("bkgts,bskd->btkgd", probs, v_cache.astype(q.dtype))
        x = x + self.o_proj(attn.reshape(b, t, self.heads * self.head_dim), lora, routing)
        h = self.post_attention_layernorm(x)
        gated = jax.nn.silu(self.gate_proj(h, lora, routing)) * self.up_proj(h, lora, routing)
        return x + self.down_proj(gated, lora, routing), k_cache, v_cache


class Llama(nnx.Module):
    """A Llama decoder (`LlamaForCausalLM` semantics) built from HF-named tensors.

    Arguments:
        config: the architecture.
        tensors: `name -> array` under HF names, projections already transposed to `[in, out]`
            and renamed `<path>.kernel` / `<path>.bias` (see `jaxlora.models.load_llama`).
    """

    def __init__(self, config: LlamaConfig, tensors: dict[str, Array]):
        self.config = config
        self.embed = nnx.Param(tensors["model.embed_tokens.weight"])
        self.layers = nnx.List([Block(config, tensors, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nnx.Param(tensors["lm_head.kernel"])
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(config)))

    @classmethod
    def random(cls, config: LlamaConfig, seed: int = 0, dtype: Any = jnp.float32) -> Llama:
        """Random weights (normal, std 0.02 like HF's init); for examples and smoke tests."""
        rng = np.random.default_rng(seed)
        tensors = {}
        for name, shape in expected_tensor_shapes(config).items():
            value = rng.normal(0.0, 0.02, shape) + float(name.endswith("norm.weight"))
            tensors[name] = jnp.asarray(value, dtype)
        return cls(config, tensors)

    @property
    def dtype(self) -> Any:
        return self.embed[...].dtype

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """`path -> (in, out)` of the projections adapters may target (HF module paths)."""
        return self.config.linear_shapes()

    def run(
        self, tokens: Array, cache: KVCache, attention_mask: Array, lora: Lora, routing: Routing
    ) -> tuple[Array, KVCache]:
        """Forward `tokens [B, T]` written at `cache.index`; returns logits `[B, T, vocab]`."""
        t = tokens.shape[1]
        mask = attention_mask.astype(bool)
        positions = cache.next_pos[:, None] + jnp.cumsum(mask, axis=1) - 1
        angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * self.inv_freq[...]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
        slots = jnp.arange(valid.shape[1])
        causal = slots[None, :] <= (cache.index + jnp.arange(t))[:, None]  # [T, L]
        full_mask = valid[:, None, :] & causal[None]  # [B, T, L]
        x = self.embed[...][tokens]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(
                x, cos, sin, full_mask, cache.k[i], cache.v[i], cache.index, lora, routing
            )
            ks.append(k)
            vs.append(v)
        x = self.norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = x @ head
        new = KVCache(
            jnp.stack(ks), jnp.stack(vs), valid, cache.index + t, cache.next_pos + mask.sum(1)
        )
        return logits, new


def expected_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor `Llama` needs, under its internal name, with its shape."""
    d = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.kernel"] = (d, config.vocab_size)
    for path, (d_in, d_out) in config.linear_shapes().items():
        shapes[path + ".kernel"] = (d_in, d_out)
        has_bias = config.mlp_bias if ".mlp." in path else config.attention_bias
        if has_bias:
            shapes[path + ".bias"] = (d_out,)
    for i in range(config.num_hidden_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (d,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
    return shapes


def check_lora(model: Llama, lora: LoraSelection, batch: int) -> Lora:
    """The canonical selection, checked against the model's projections (at trace time)."""
    return check_selection(lora, model.lora_shapes(), batch=batch)


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"))
def _run_jit(graphdef, state, tokens, cache, mask, lora, routing):
    return nnx.merge(graphdef, state).run(tokens, cache, mask, lora, routing)


def forward_with_cache(
    model: Llama,
    tokens: Array,
    cache: KVCache,
    *,
    attention_mask: Array | None = None,
    lora: LoraSelection = None,
    routing: Routing = "auto",
) -> tuple[Array, KVCache]:
    """Jit-compiled forward that writes `tokens [B, T]` into `cache` (spec SW-LLAMA-6).

    Returns `(logits [B, T, vocab], new cache)`; the input cache is not modified.

    Example:
        >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
        >>> cache = init_cache(model.config, 1, 8, model.dtype)
        >>> logits, cache = forward_with_cache(model, jnp.asarray([[1, 2, 3]]), cache)
        >>> int(cache.index), logits.shape
        (3, (1, 3, 64))
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    lora = check_lora(model, lora, tokens.shape[0])
    room = cache.valid.shape[1] - int(cache.index)
    if tokens.shape[1] > room:
        raise ShapeMismatchError(
            f"{tokens.shape[1]} tokens do not fit: the cache has {cache.valid.shape[1]} slots "
            f"and {int(cache.index)} are used; make it with init_cache(..., max_len=...) larger."
        )
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask
    graphdef, state = nnx.split(model)
    return _run_jit(graphdef, state, tokens, cache, jnp.asarray(mask, bool), lora, routing)


@functools.partial(jax.jit, static_argnames=("graphdef", "routing"))
def _forward_jit(graphdef, state, tokens, mask, lora, routing):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1], model.dtype)
    return model.run(tokens, cache, mask, lora, routing)[0]


def forward(
    model: Llama,
    tokens: Array | Sequence[Sequence[int]],
    *,
    attention_mask: Array | None = None,
    lora: LoraSelection = None,
    routing: Routing = "auto",
) -> Array:
    """Jit-compiled logits `[B, T, vocab]` of `tokens [B, T]` (spec SW-LLAMA-1..4).

    One compilation serves every adapter of a conformed bank (same treedef and shapes), and
    every assignment of adapters to rows with `stacked.route(names)`; `select(bank, None)` runs
    the base model inside that compilation.

    Arguments:
        model: the decoder.
        tokens: int token ids `[B, T]`.
        attention_mask: `[B, T]`, 0 at (left) padding; default all ones.
        lora: `jaxlora.select(bank, name)`, one adapter, `stacked.route(names)` or None (the
            base model).
        routing: the mixed-batch kernel (see `jaxlora.routing`).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    lora = check_lora(model, lora, tokens.shape[0])
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask
    graphdef, state = nnx.split(model)
    return _forward_jit(graphdef, state, tokens, jnp.asarray(mask, bool), lora, routing)
