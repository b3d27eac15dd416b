"""`LlamaConfig`: the fields of a Hugging Face decoder `config.json` that change inference.

One decoder, several families (spec SW-FAM-1): `model_type` picks the feature flags of the
family, each a field of `LlamaConfig`, so no family has its own copy of the model:

- `llama` (`LlamaForCausalLM`): `attention_bias` (q/k/v/o), `mlp_bias`;
- `qwen2` (`Qwen2ForCausalLM`, Qwen2 and Qwen2.5): `qkv_bias` (q/k/v, none on o), sliding
  windows on the layers `use_sliding_window` / `layer_types` name;
- `qwen3` (`Qwen3ForCausalLM`): `qk_norm` (an RMSNorm per head), explicit `head_dim`, windows
  as Qwen2;
- `mistral` (`MistralForCausalLM`): `sliding_window` on every layer.

Parsed from the JSON dict `transformers` writes (both the v4 layout, `rope_theta` +
`rope_scaling`, and the v5 layout, `rope_parameters`). Anything that would change the forward but
is not implemented (another family, `hidden_act`, RoPE variant or layer type) is refused with
`UnsupportedFeatureError`, never ignored (spec SW-LLAMA-2, SW-FAM-2). Missing fields take the
defaults of the family's `transformers` config class.

Example:
    >>> cfg = LlamaConfig.from_dict({"hidden_size": 24, "num_attention_heads": 3,
    ...     "num_hidden_layers": 2, "intermediate_size": 40, "vocab_size": 64})
    >>> cfg.head_dim, cfg.num_key_value_heads, cfg.rope_type
    (8, 3, 'default')
    >>> qwen = LlamaConfig.from_dict({"model_type": "qwen2", "hidden_size": 24,
    ...     "num_attention_heads": 3, "num_key_value_heads": 1, "num_hidden_layers": 2,
    ...     "intermediate_size": 40, "vocab_size": 64})
    >>> qwen.has_bias("self_attn.q_proj"), qwen.has_bias("self_attn.o_proj")
    (True, False)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, UnsupportedFeatureError

__all__ = ["FAMILIES", "SUPPORTED_ROPE_TYPES", "LlamaConfig", "rope_inv_freq"]

#: RoPE variants implemented here (HF `rope_type`); others are refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: The decoder families implemented, HF `model_type -> ForCausalLM architecture` (SW-FAM-1).
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}

#: HF `layer_types` entries implemented (`sliding_attention` uses `sliding_window`).
LAYER_TYPES = ("full_attention", "sliding_attention")

#: HF defaults of fields whose default differs between the families' config classes.
_QWEN3_HEAD_DIM = 128
_KV_HEADS = {"qwen2": 32, "qwen3": 32, "mistral": 8}  # when absent (null: = heads)
_DEFAULT_WINDOW = 4096
_QWEN_MAX_WINDOW_LAYERS = 28


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters of a Llama-family decoder (HF field names).

    `rope` holds the RoPE parameters other than the type and theta (`factor`, ...). The family
    flags: `attention_bias` biases q/k/v/o (Llama, Qwen3), `qkv_bias` only q/k/v (Qwen2);
    `qk_norm` applies an RMSNorm over each head's `head_dim` features to queries and keys before
    RoPE (Qwen3); `sliding_window` restricts attention to the last `sliding_window` cache slots
    on the layers `layer_types` marks `"sliding_attention"` (every layer when `layer_types` is
    empty), as `transformers` does (Mistral; Qwen with `use_sliding_window`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope: tuple[tuple[str, float], ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> LlamaConfig:
        """From a `config.json` dict; `source` names the file in error messages."""
        model_type = _family(raw, source)
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedFeatureError(
                f"{source}: hidden_act={act!r} is not supported (Llama's SwiGLU uses 'silu')."
            )
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in raw
        ]
        if missing:
            raise ConfigError(f"{source}: missing required fields {missing}.")
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads", _KV_HEADS.get(model_type)) or heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}."
            )
        default_head_dim = int(raw["hidden_size"]) // heads
        if model_type == "qwen3":
            default_head_dim = _QWEN3_HEAD_DIM
        head_dim = raw.get("head_dim") or default_head_dim
        theta, rope_type, rope = _rope_fields(raw, source)
        layers = int(raw["num_hidden_layers"])
        window, layer_types = _windows(raw, model_type, layers, source)
        # Which biases each family has: Llama and Qwen3 read `attention_bias` (q/k/v/o), Qwen2
        # always biases q/k/v and never o, Mistral has none; only Llama reads `mlp_bias`.
        attention_bias = model_type in ("llama", "qwen3") and bool(raw.get("attention_bias"))
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
            model_type=model_type,
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            layer_types=layer_types,
        )

    def has_bias(self, name: str) -> bool:
        """Whether projection `name` (`"self_attn.q_proj"`, `"mlp.up_proj"`, ...) has a bias."""
        if name.startswith("mlp."):
            return self.mlp_bias
        return self.attention_bias or (self.qkv_bias and not name.endswith("o_proj"))

    def window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (None: full causal attention).

        Example:
            >>> LlamaConfig(64, 8, 16, 2, 2, 2, 4, sliding_window=3).window(1)
            3
        """
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`path -> (in, out)` of every LoRA-targetable projection, under HF module paths."""
        d, h, kv, hd = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        per_layer = {
            "self_attn.q_proj": (d, h * hd),
            "self_attn.k_proj": (d, kv * hd),
            "self_attn.v_proj": (d, kv * hd),
            "self_attn.o_proj": (h * hd, d),
            "mlp.gate_proj": (d, self.intermediate_size),
            "mlp.up_proj": (d, self.intermediate_size),
            "mlp.down_proj": (self.intermediate_size, d),
        }
        return {
            f"model.layers.{i}.{name}": shape
            for i in range(self.num_hidden_layers)
            for name, shape in per_layer.items()
        }


def _family(raw: Mapping[str, Any], source: str) -> str:
    """The checked `model_type` (default `llama`), consistent with `architectures`."""
    model_type = raw.get("model_type", "llama")
    supported = ", ".join(f"{t!r} ({a})" for t, a in FAMILIES.items())
    if model_type not in FAMILIES:
        raise UnsupportedFeatureError(
            f"{source}: model_type={model_type!r} is not supported; jaxlora.models loads the "
            f"decoder families {supported}. Gemma and other families are not implemented."
        )
    archs = raw.get("architectures") or []
    causal = FAMILIES[model_type]
    allowed = (causal, causal.replace("ForCausalLM", "Model"))
    other = [a for a in archs if a not in allowed]
    if other:
        raise UnsupportedFeatureError(
            f"{source}: architectures={other} is not supported for model_type={model_type!r}; "
            f"jaxlora.models implements {causal} (a causal LM) of the families {supported}."
        )
    return model_type


def _windows(
    raw: Mapping[str, Any], model_type: str, layers: int, source: str
) -> tuple[int | None, tuple[str, ...]]:
    """`(sliding_window, layer_types)` as the family's transformers config derives them."""
    if model_type == "llama":
        return None, ()
    if model_type == "mistral":  # MistralModel: the window on every layer (layer_types unused)
        window = raw.get("sliding_window", _DEFAULT_WINDOW)
        types: tuple[str, ...] = ()
    else:  # Qwen2 / Qwen3: a window only with use_sliding_window, on the layers it names
        window = (
            raw.get("sliding_window", _DEFAULT_WINDOW) if raw.get("use_sliding_window") else None
        )
        types = tuple(raw.get("layer_types") or ())
        if not types:
            first = int(raw.get("max_window_layers", _QWEN_MAX_WINDOW_LAYERS))
            sliding = window is not None
            types = tuple(
                "sliding_attention" if sliding and i >= first else "full_attention"
                for i in range(layers)
            )
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedFeatureError(
                f"{source}: layer_types {unknown} are not implemented (supported: "
                f"{', '.join(LAYER_TYPES)})."
            )
        if len(types) != layers:
            raise ConfigError(
                f"{source}: layer_types has {len(types)} entries for num_hidden_layers={layers}."
            )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"{source}: sliding_window={window!r} must be a positive int or null.")
    return window, types


def _rope_fields(raw: Mapping[str, Any], source: str) -> tuple[float, str, tuple]:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params.update(scaling)
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedFeatureError(
            f"{source}: rope_type={rope_type!r} is not implemented (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); refusing rather than computing wrong positions."
        )
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedFeatureError(
            f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported."
        )
    needed = {
        "default": (),
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }[rope_type]
    absent = [k for k in needed if k not in params]
    if absent:
        raise ConfigError(f"{source}: rope_type={rope_type!r} needs {absent} in rope parameters.")
    return theta, rope_type, tuple((k, float(params[k])) for k in needed)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies `[head_dim // 2]` (float32), as transformers computes them.

    Example:
        >>> cfg = LlamaConfig(64, 8, 16, 1, 2, 2, 4, rope_theta=100.0)
        >>> rope_inv_freq(cfg).tolist()
        [1.0, 0.10000000149011612]
    """
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv = inv.astype(np.float32)
    p = dict(config.rope)
    if config.rope_type == "linear":
        inv = inv / np.float32(p["factor"])
    elif config.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)
