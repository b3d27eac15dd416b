"""Write a Hugging Face model checkpoint directory: `config.json` + `model.safetensors`
(spec SW-IO-12).

The layout `transformers`' `save_pretrained` writes for a model that fits one file: the config as
JSON and every tensor under its HF name (`model.layers.0.self_attn.q_proj.weight`, `[out, in]`)
in one safetensors file with metadata `{"format": "pt"}` (transformers refuses files without
it). This module knows the files, not any model: the caller gives HF-named tensors and the
config dict (`jaxlora.models.save_llama` does that for a Llama). The directory is written
atomically (`atomic_directory`, SW-IO-13).

Example:
    >>> import numpy as np, tempfile, json, os
    >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> save_hf_checkpoint(d, {"w.weight": np.eye(2, dtype=np.float32)}, {"model_type": "toy"})
    >>> sorted(os.listdir(d)), json.load(open(os.path.join(d, "config.json")))
    (['config.json', 'model.safetensors'], {'model_type': 'toy'})
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..errors import CheckpointError, ConfigError
from ._atomic import atomic_directory, check_replaceable
from ._names import MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, SAFETENSORS_METADATA
from ._safetensors import write_tensors

__all__ = ["save_hf_checkpoint"]

#: dtypes a checkpoint tensor may have (what safetensors and transformers both read)
_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float64, np.float32, np.float16, ml_dtypes.bfloat16, np.int64, np.int32, np.int16,
        np.int8, np.uint8, np.bool_,
    )
)  # fmt: skip


def _checked_tensors(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping) or not tensors:
        raise ConfigError(
            "save_hf_checkpoint needs a non-empty mapping `HF tensor name -> array`, got "
            f"{type(tensors).__name__} with {len(tensors) if isinstance(tensors, Mapping) else 0} "
            "entries."
        )
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"checkpoint tensor names must be non-empty strings, got {name!r}.")
        array = np.asarray(value)
        if array.dtype not in _DTYPES:
            raise ConfigError(
                f"checkpoint tensor {name!r} has dtype {array.dtype}; safetensors checkpoints "
                "hold float64/float32/float16/bfloat16, integer or bool tensors. Cast it first."
            )
        arrays[name] = np.ascontiguousarray(array)
    return arrays


def _config_text(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping) or not isinstance(config.get("model_type"), str):
        raise ConfigError(
            "the checkpoint config must be a mapping with a string `model_type` (transformers' "
            f"AutoConfig dispatches on it), got {config!r:.120}."
        )
    try:
        return json.dumps(dict(config), indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"the checkpoint config is not JSON-serialisable ({err}); use str, int, finite "
            "float, bool, None, lists and dicts only."
        ) from None


def _is_checkpoint(directory: Path) -> bool:
    return (directory / MODEL_CONFIG_NAME).is_file()


def save_hf_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> None:
    """Write `config.json` and `model.safetensors` to the directory `path`, atomically.

    Arguments:
        path: the checkpoint directory to create or replace. An existing directory is replaced
            whole, only if it is empty or already holds a `config.json` (else `CheckpointError`).
        tensors: HF tensor name -> array (NumPy, JAX, anything `np.asarray` takes), stored as
            given (dtype and orientation: transformers' `Linear.weight` is `[out, in]`).
        config: the `config.json` content; needs a string `model_type`.

    Raises `ConfigError` (naming the tensor or field) for tensors or a config that cannot be
    stored, before anything is written.
    """
    arrays = _checked_tensors(tensors)
    text = _config_text(config)
    target = Path(path)
    check_replaceable(
        target,
        _is_checkpoint,
        error=CheckpointError,
        what=f"a checkpoint ({MODEL_CONFIG_NAME})",
        writer="save_hf_checkpoint",
    )
    with atomic_directory(target) as tmp:
        write_tensors(tmp / MODEL_WEIGHTS_NAME, arrays, SAFETENSORS_METADATA)
        (tmp / MODEL_CONFIG_NAME).write_text(text, encoding="utf-8")
