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
from .attention import Where, attend, locate
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
    """Preallocated keys/values, one slot-contiguous region per row (a pytree; spec SW-ENGINE-6).

    Row `r`'s tokens sit at slots `0..lengths[r] - 1` of row `r` of every layer's arrays, in
    order of position (left padding is never stored); see `jaxlora.models.attention`.

    Arguments:
        k, v: one array per layer, `[rows, kv_heads, max_len, head_dim]` (heads-major).
        lengths: `[rows]` int32, the tokens each row holds (the position of its next token).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    lengths: Array

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[2])

    @property
    def next_pos(self) -> Array:
        """`[rows]` the RoPE position (and slot) of each row's next token: `lengths`."""
        return self.lengths

    @property
    def index(self) -> Array:  # pyright: ignore[reportIncompatibleMethodOverride]
        """The most slots any row uses (int32 scalar)."""
        return jnp.max(self.lengths)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any) -> KVCache:
    """An empty cache for `batch` rows of at most `max_len` tokens each (prompt + generated).

    Its size is `jaxlora.models.attention.cache_bytes(layers, batch, max_len, kv_heads,
    head_dim, dtype)`; `dtype` may differ from the model's (e.g. `jnp.bfloat16`).
    """
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    return KVCache(
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        tuple(jnp.zeros(shape, dtype) for _ in layers),
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
        # Family flags (jaxlora.models.config): Qwen3's per-head q/k RMSNorm, sliding windows.
        norm = {
            name: RMSNorm(t[f"{p}self_attn.{name}.weight"], config.rms_norm_eps)
            if config.qk_norm
            else None
            for name in ("q_norm", "k_norm")
        }
        self.q_norm, self.k_norm = norm["q_norm"], norm["k_norm"]
        self.window = config.window(i)

    def __call__(self, x, cos, sin, where: Where, k_cache, v_cache, lora, routing):
        b, t, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h, lora, routing).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(h, lora, routing).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(h, lora, routing).reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:  # Qwen3: per head, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = _rotate(q, cos[:, :, None, :], sin[:, :, None, :])
        k = _rotate(k, cos[:, :, None, :], sin[:, :, None, :])
        # Mistral / Qwen sliding layers (SW-FAM-3): `window` limits what each token sees.
        attn, k_cache, v_cache = attend(q, k, v, k_cache, v_cache, where, self.window)
        x = x + self.o_proj(attn, lora, routing)
        h = self.post_attention_layernorm(x)
        gated = jax.nn.silu(self.gate_proj(h, lora, routing)) * self.up_proj(h, lora, routing)
        return x + self.down_proj(gated, lora, routing), k_cache, v_cache


class Llama(nnx.Module):
    """A Llama-family decoder built from HF-named tensors (spec SW-LLAMA-1, SW-FAM-1).

    `LlamaForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `MistralForCausalLM`
    semantics, as `config.model_type` and the family flags of `LlamaConfig` say. The tensors
    may be sharded `jax.Array`s (`jaxlora.models.tp`): the forward is the same code.

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

    def tensors(self) -> dict[str, Array]:
        """`internal name -> array` of every tensor: the inverse of `Llama(config, tensors)`.

        Example:
            >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
            >>> sorted(model.tensors()) == sorted(expected_tensor_shapes(model.config))
            True
        """
        out = {
            "model.embed_tokens.weight": self.embed[...],
            "model.norm.weight": self.norm.weight[...],
        }
        if self.lm_head is not None:
            out["lm_head.kernel"] = self.lm_head[...]
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            for name in PROJECTIONS:
                linear = getattr(layer, name.rsplit(".", 1)[1])
                out[p + name + ".kernel"] = linear.kernel[...]
                if linear.bias is not None:
                    out[p + name + ".bias"] = linear.bias[...]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                out[p + norm + ".weight"] = getattr(layer, norm).weight[...]
            if layer.q_norm is not None and layer.k_norm is not None:
                out[p + "self_attn.q_norm.weight"] = layer.q_norm.weight[...]
                out[p + "self_attn.k_norm.weight"] = layer.k_norm.weight[...]
        return out

    @property
    def dtype(self) -> Any:
        return self.embed[...].dtype

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """`path -> (in, out)` of the projections adapters may target (HF module paths)."""
        return self.config.linear_shapes()

    def run(
        self,
        tokens: Array,
        cache: KVCache,
        attention_mask: Array | None = None,
        lora: Lora = None,
        routing: Routing = "auto",
        *,
        positions: Array | None = None,
        rows: Array | None = None,
        logits_at: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Forward `tokens [B, T]` through `cache`; returns `(logits [B, T, vocab], new cache)`.

        By default batch row `b` is cache row `b` and its real tokens (`attention_mask`, 0 at
        padding) continue its sequence at positions `lengths[b], lengths[b] + 1, ...` (padding
        is neither stored nor attended to). The engine (`jaxlora.engine`) passes instead:

        Arguments:
            positions: `[B, T]` each token's position (= its cache slot); -1 for padding.
            rows: `[B]` the cache row of each batch row (`rows` of the cache: none, dropped).
            logits_at: `[B]` one index into `T` per row: only those logits (`[B, 1, vocab]`).
        """
        if positions is None:
            mask = jnp.ones(tokens.shape, bool) if attention_mask is None else attention_mask
            mask = jnp.asarray(mask).astype(bool)
            start = cache.lengths if rows is None else jnp.take(cache.lengths, rows, mode="clip")
            positions = jnp.where(mask, start[:, None] + jnp.cumsum(mask, axis=1) - 1, -1)
        where = locate(positions, cache.max_len, rows)
        angles = jnp.maximum(where.positions, 0).astype(jnp.float32)[..., None]
        angles = angles * self.inv_freq[...]
        angles = jnp.concatenate([angles, angles], axis=-1)
        cos, sin = jnp.cos(angles).astype(self.dtype), jnp.sin(angles).astype(self.dtype)
        x = self.embed[...][tokens]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, where, cache.k[i], cache.v[i], lora, routing)
            ks.append(k)
            vs.append(v)
        if logits_at is not None:
            x = jnp.take_along_axis(x, jnp.asarray(logits_at)[:, None, None], axis=1)
        x = self.norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = x @ head
        # A row's length becomes one past its last written token (unchanged if none written).
        written = where.positions >= 0
        index = jnp.arange(tokens.shape[0]) if rows is None else rows
        old = jnp.take(cache.lengths, index, mode="clip")
        new = jnp.where(written.any(axis=1), where.positions.max(axis=1) + 1, old)
        lengths = cache.lengths.at[index].set(new.astype(jnp.int32), mode="drop")
        return logits, KVCache(tuple(ks), tuple(vs), lengths)


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
        if config.has_bias(path.split(".", 3)[3]):
            shapes[path + ".bias"] = (d_out,)
    for i in range(config.num_hidden_layers):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (d,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (d,)
        if config.qk_norm:
            shapes[f"model.layers.{i}.self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[f"model.layers.{i}.self_attn.k_norm.weight"] = (config.head_dim,)
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
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    used = np.asarray(cache.lengths)
    if (used + mask.astype(bool).sum(axis=1) > cache.max_len).any():
        raise ShapeMismatchError(
            f"{int(mask.astype(bool).sum(axis=1).max())} tokens do not fit: the cache has "
            f"{cache.max_len} slots and {int(used.max())} are used; make it with "
            "init_cache(..., max_len=...) larger."
        )
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
