"""Load a Hugging Face Llama checkpoint directory into a `jaxlora.models.Llama`.

A checkpoint directory holds `config.json` and either `model.safetensors` or a sharded
`model.safetensors.index.json` (+ the shards it names). Pickle files (`pytorch_model.bin`) are
never opened. Every tensor is checked against the config: missing, unexpected and mis-shaped
tensors raise `CheckpointError` / `ShapeMismatchError` naming the tensor (spec SW-LLAMA-2).

Example:
    >>> import tempfile, transformers
    >>> d = tempfile.mkdtemp()
    >>> transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16,
    ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(d)
    >>> load_llama(d).lora_shapes()["model.layers.0.mlp.up_proj"]
    (16, 32)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from safetensors import safe_open

from ..errors import CheckpointError, ShapeMismatchError, format_names
from .config import LlamaConfig
from .llama import Llama, expected_tensor_shapes

__all__ = ["load_llama", "read_config"]

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
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{str(path)!r} has no config.json; a checkpoint directory needs config.json and "
            f"model.safetensors (found: {format_names(sorted(p.name for p in path.iterdir()))})."
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{str(config_file)!r} is not valid JSON: {err}.") from None
    return LlamaConfig.from_dict(raw, source=str(config_file))


def _weight_files(path: Path) -> dict[str, Path]:
    """`tensor name -> file` for a single or sharded safetensors checkpoint."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
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
    if (path / "pytorch_model.bin").exists():
        raise CheckpointError(
            f"{str(path)!r} holds only pytorch_model.bin, a pickle that jaxlora never loads "
            "(it can run code). Convert it once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)."
        )
    raise CheckpointError(
        f"{str(path)!r} has no model.safetensors and no model.safetensors.index.json."
    )


def _internal_name(name: str, config: LlamaConfig) -> tuple[str, bool] | None:
    """HF tensor name -> (internal name, transpose?) or None to skip."""
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


def load_llama(directory: str | os.PathLike, *, dtype: Any = None) -> Llama:
    """Load a Llama checkpoint directory (spec SW-LLAMA-1, SW-LLAMA-2).

    Arguments:
        directory: `config.json` + `model.safetensors` (or a sharded index).
        dtype: cast every tensor to this dtype; default keep the stored dtypes.

    Returns:
        A `Llama` whose projection kernels are `[in, out]` under HF module paths.
    """
    path = Path(directory)
    config = read_config(path)
    files = _weight_files(path)
    expected = expected_tensor_shapes(config)
    tensors: dict[str, Any] = {}
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, "flax") as f:
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
                value = f.get_tensor(name)
                value = value.T if transpose else value
                if tuple(value.shape) != expected[internal]:
                    want = expected[internal][::-1] if transpose else expected[internal]
                    stored = tuple(f.get_slice(name).get_shape())
                    raise ShapeMismatchError(
                        f"{file.name}: tensor {name!r} has shape {stored}"
                        f" but config.json implies {tuple(want)}; the weights and config.json "
                        "belong to different models."
                    )
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
