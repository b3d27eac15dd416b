"""Hugging Face Llama checkpoints <-> `jaxlora.models.Llama`: both directions of the HF naming.

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` (+ the shards it names). Pickle files (`pytorch_model.bin`) are
never opened. Every tensor is checked against the config: missing, unexpected and mis-shaped
tensors raise `CheckpointError` / `ShapeMismatchError` naming the tensor (spec SW-LLAMA-2).

`save_llama` writes the checkpoint `LlamaForCausalLM.save_pretrained` would (HF names, `[out,
in]` weights, `config.json`), through `jaxlora.io.save_hf_checkpoint`, so transformers and
`load_llama` both read it without torch being needed to write it (spec SW-LLAMA-7). The
HF <-> internal naming lives here, next to the loader; `jaxlora.io` only knows the files.

Example:
    >>> import tempfile
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> d = tempfile.mkdtemp() + "/llama"
    >>> save_llama(d, Llama.random(LlamaConfig(32, 16, 32, 1, 2, 2, 8)))
    >>> load_llama(d).lora_shapes()["model.layers.0.mlp.up_proj"]
    (16, 32)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from ..errors import (
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    UnsupportedFeatureError,
    format_names,
)
from ..io import (
    MODEL_CONFIG_NAME,
    MODEL_INDEX_NAME,
    MODEL_PICKLE_NAME,
    MODEL_WEIGHTS_NAME,
    save_hf_checkpoint,
)
from . import tp
from .config import LlamaConfig
from .llama import Llama, expected_tensor_shapes

__all__ = ["hf_config_dict", "load_llama", "read_config", "save_llama"]

#: Tensors transformers may save that the forward recomputes (RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(directory: str | os.PathLike) -> LlamaConfig:
    """The `LlamaConfig` of a checkpoint directory's `config.json`."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(
            f"{str(path)!r} is not a directory; pass a Hugging Face checkpoint directory "
            "(config.json + model.safetensors), e.g. one written by save_pretrained."
        )
    config_file = path / MODEL_CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no {MODEL_CONFIG_NAME}; a checkpoint directory needs "
            f"{MODEL_CONFIG_NAME} and {MODEL_WEIGHTS_NAME} "
            f"(found: {format_names(sorted(p.name for p in path.iterdir()))})."
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON: {err}.") from None
    return LlamaConfig.from_dict(raw, source=str(config_file))


def _weight_files(path: Path) -> dict[str, Path]:
    """`tensor name -> file` for a single or sharded safetensors checkpoint."""
    single = path / MODEL_WEIGHTS_NAME
    index = path / MODEL_INDEX_NAME
    if single.is_file():
        with safe_open(single, "flax") as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"{str(index)!r} is not a safetensors index (needs a 'weight_map'): {err}."
            ) from None
        files = {name: path / shard for name, shard in weight_map.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(
                f"{str(index)!r} names shard files that do not exist: {format_names(absent)}."
            )
        return files
    if (path / MODEL_PICKLE_NAME).exists():
        raise CheckpointError(
            f"{str(path)!r} holds only {MODEL_PICKLE_NAME}, a pickle that jaxlora never loads "
            "(it can run code). Convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)."
        )
    raise CheckpointError(f"{str(path)!r} has no {MODEL_WEIGHTS_NAME} and no {MODEL_INDEX_NAME}.")


def _internal_name(name: str, config: LlamaConfig) -> tuple[str, bool] | None:
    """HF tensor name -> (internal name, transpose?) or None to skip; `_hf_name` inverts it."""
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    if name == "lm_head.weight":
        return None if config.tie_word_embeddings else ("lm_head.kernel", True)
    if not name.startswith("model."):
        name = "model." + name  # a bare LlamaModel checkpoint
    stem, _, leaf = name.rpartition(".")
    if stem.rsplit(".", 1)[-1].endswith("_proj"):
        return (f"{stem}.kernel", True) if leaf == "weight" else (name, False)
    return name, False


def load_llama(directory: str | os.PathLike, *, dtype: Any = None, mesh: Any = None) -> Llama:
    """Load a Llama, Qwen2/2.5, Qwen3 or Mistral checkpoint directory (spec SW-LLAMA-1,
    SW-LLAMA-2, SW-FAM-1).

    Arguments:
        directory: `config.json` + `model.safetensors` (or a sharded index).
        dtype: cast every tensor to this dtype; default keep the stored dtypes.
        mesh: a `jax.sharding.Mesh`: load each tensor straight into its tensor-parallel shards
            (`jaxlora.models.tp`), every device reading only its slice of the file (SW-TP-3).

    Returns:
        A `Llama` whose projection kernels are `[in, out]` under HF module paths.
    """
    path = Path(directory)
    config = read_config(path)
    files = _weight_files(path)
    expected = expected_tensor_shapes(config)
    shardings = None if mesh is None else tp.model_shardings(config, mesh)
    tensors: dict[str, Any] = {}
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, "flax" if mesh is None else "numpy") as f:
            available = set(f.keys())
            for name in names:
                if name not in available:
                    raise CheckpointError(
                        f"the index maps {name!r} to {file.name}, which lacks it."
                    )
                target = _internal_name(name, config)
                if target is None:
                    continue
                internal, transpose = target
                if internal not in expected:
                    unexpected.append(name)
                    continue
                stored = tuple(f.get_slice(name).get_shape())
                if (stored[::-1] if transpose else stored) != expected[internal]:
                    want = expected[internal][::-1] if transpose else expected[internal]
                    raise ShapeMismatchError(
                        f"{file.name}: tensor {name!r} has shape {stored}"
                        f" but config.json implies {tuple(want)}; the weights and config.json "
                        "belong to different models."
                    )
                if shardings is not None:
                    sliced, sharding = f.get_slice(name), shardings[internal]
                    tensors[internal] = tp.read_sharded(sliced, transpose, sharding, dtype)
                    continue
                value = f.get_tensor(name)
                value = value.T if transpose else value
                tensors[internal] = value if dtype is None else jnp.asarray(value, dtype)
    if unexpected:
        raise CheckpointError(
            f"{str(path)!r} holds tensors this Llama config does not use: "
            f"{format_names(sorted(unexpected), 8)} (attention_bias/mlp_bias or "
            "num_hidden_layers in config.json may disagree with the weights)."
        )
    missing = sorted(n.replace(".kernel", ".weight") for n in set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{str(path)!r} lacks tensors the config needs: {format_names(missing, 8)}; "
            "config.json (tie_word_embeddings, num_hidden_layers, attention_bias, mlp_bias) "
            "and the weights disagree."
        )
    return Llama(config, tensors)


def _hf_name(internal: str) -> tuple[str, bool]:
    """Internal tensor name -> (HF name, transpose?): `<path>.kernel [in, out]` is
    `<path>.weight [out, in]` (the inverse of `_internal_name`)."""
    if internal.endswith(".kernel"):
        return internal.removesuffix(".kernel") + ".weight", True
    return internal, False


#: RoPE parameters transformers expects as ints (the others are floats).
_INT_ROPE_FIELDS = frozenset({"original_max_position_embeddings"})


def hf_config_dict(config: LlamaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The `config.json` of a `transformers` Llama with this architecture.

    RoPE is written in the layout every transformers version reads (`rope_theta` +
    `rope_scaling`, which v5 converts to `rope_parameters`); `read_config` reads both.

    Example:
        >>> d = hf_config_dict(LlamaConfig(64, 16, 32, 2, 4, 2, 4, rope_theta=500.0))
        >>> d["model_type"], d["num_key_value_heads"], d["rope_theta"], d["rope_scaling"]
        ('llama', 2, 500.0, None)
    """
    if config.model_type != "llama":
        raise UnsupportedFeatureError(
            f"writing a {config.model_type!r} checkpoint is not supported: save_llama writes "
            "model_type 'llama' only (the loader reads every family in SW-FAM-1)."
        )
    scaling = None
    if config.rope_type != "default":
        scaling = {"rope_type": config.rope_type} | {
            k: int(v) if k in _INT_ROPE_FIELDS else float(v) for k, v in config.rope
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        "torch_dtype": jnp.dtype(dtype).name,
    }


def save_llama(
    directory: str | os.PathLike,
    model: Llama,
    *,
    dtype: Any = None,
    config_fields: Mapping[str, Any] | None = None,
) -> None:
    """Write `model` as a Hugging Face checkpoint directory, atomically (spec SW-LLAMA-7).

    `transformers.LlamaForCausalLM.from_pretrained(directory)` and `load_llama(directory)` both
    read it; `load_llama` gives back the same tensors bitwise (in the stored dtype).

    Arguments:
        directory: created or replaced (only if empty or already a checkpoint).
        model: the Llama to write.
        dtype: cast every tensor to this dtype (e.g. `jnp.bfloat16`); default as held.
        config_fields: extra `config.json` fields that do not change the architecture, e.g.
            `{"eos_token_id": 2, "bos_token_id": 1, "max_position_embeddings": 4096}`.

    Raises `ConfigError` when `config_fields` sets a field the model determines.
    """
    fields = dict(config_fields or {})
    tensors = {}
    for internal, value in model.tensors().items():
        name, transpose = _hf_name(internal)
        array = np.asarray(value if dtype is None else jnp.asarray(value, dtype))
        tensors[name] = array.T if transpose else array
    config = hf_config_dict(model.config, tensors["model.embed_tokens.weight"].dtype)
    clash = sorted(set(fields) & set(config))
    if clash:
        raise ConfigError(
            f"config_fields sets {clash}, which the model itself determines; change the model "
            "(its LlamaConfig, or dtype=) instead. config_fields is for fields such as "
            "eos_token_id or max_position_embeddings."
        )
    save_hf_checkpoint(directory, tensors, config | fields)
