"""`LlamaConfig`: the fields of a Hugging Face Llama `config.json` that change inference.

Parsed from the JSON dict `transformers` writes (both the v4 layout, `rope_theta` +
`rope_scaling`, and the v5 layout, `rope_parameters`). Anything that would change the forward but
is not implemented is refused with `UnsupportedFeatureError`, never ignored (spec SW-LLAMA-2).

Example:
    >>> cfg = LlamaConfig.from_dict({"hidden_size": 24, "num_attention_heads": 3,
    ...     "num_hidden_layers": 2, "intermediate_size": 40, "vocab_size": 64})
    >>> cfg.head_dim, cfg.num_key_value_heads, cfg.rope_type
    (8, 3, 'default')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, UnsupportedFeatureError

__all__ = ["SUPPORTED_ROPE_TYPES", "LlamaConfig", "rope_inv_freq"]

#: RoPE variants implemented here (HF `rope_type`); others are refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters of a Llama-family decoder (HF field names).

    `rope` holds the RoPE parameters other than the type and theta (`factor`, ...).
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

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> LlamaConfig:
        """From a `config.json` dict; `source` names the file in error messages."""
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise UnsupportedFeatureError(
                f"{source}: model_type={model_type!r} is not supported; jaxlora.models.llama "
                "loads Llama checkpoints (model_type 'llama') only."
            )
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
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}."
            )
        head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // heads
        theta, rope_type, rope = _rope_fields(raw, source)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
        )

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
