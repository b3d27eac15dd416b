"""Save adapters in PEFT's on-disk layout, atomically (spec SW-IO-1, SW-IO-6, SW-IO-10).

Layout (as PEFT's `save_pretrained`): the adapter named "default" in the root directory, every
other adapter in `<dir>/<name>/`; each with `adapter_config.json` and
`adapter_model.safetensors` (metadata `{"format": "pt"}`). A bank without a "default" adapter
leaves the root without an adapter, exactly as PEFT does.

Atomicity: everything is written into a temporary directory next to the target, fsynced, then
swapped into place (`jaxlora.io.atomic_directory`); a failure before the swap leaves the
previous directory untouched (SW-IO-10, SW-IO-13).

Example:
    >>> import jax.numpy as jnp, tempfile, json, os
    >>> from jaxlora import LoraWeights
    >>> w = LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(0.5))
    >>> d = os.path.join(tempfile.mkdtemp(), "ad")
    >>> save_peft(d, {"blocks.0.q": w})
    >>> cfg = json.load(open(os.path.join(d, ADAPTER_CONFIG_NAME)))
    >>> cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    (2, 1, ['blocks.0.q'])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AdapterFormatError, ConfigError
from ..weights import LoraWeights
from ._atomic import atomic_directory, check_replaceable
from ._config import derive_config_dict
from ._keys import check_adapter_name, identity, peft_key
from ._names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, SAFETENSORS_METADATA
from ._safetensors import write_tensors

__all__ = ["save_peft"]


def _as_named_adapters(adapters: Mapping) -> dict[str, Mapping[str, LoraWeights]]:
    """A bank / `name -> adapter` mapping, or one adapter (saved as "default")."""
    values = list(adapters.values())
    if values and all(isinstance(v, LoraWeights) for v in values):
        return {"default": adapters}
    if not values or not all(isinstance(v, Mapping) for v in values):
        raise ConfigError(
            "save_peft expects an AdapterBank, a mapping `name -> adapter`, or one adapter "
            f"(`path -> LoraWeights`); got {type(adapters).__name__} with "
            f"{len(values)} entries."
        )
    return dict(adapters)


def _adapter_files(
    adapter: Mapping[str, LoraWeights],
    key_map: Callable[[str], str],
    dtype: Any,
    config_fields: dict[str, Any],
    name: str,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tensors: dict[str, np.ndarray] = {}
    layers: dict[str, tuple[int, float]] = {}
    for path, w in adapter.items():
        if not isinstance(w, LoraWeights) or np.ndim(w.a) != 2 or np.ndim(w.scale) != 0:
            raise ConfigError(
                f"adapter {name!r}, layer {path!r}: expected unstacked LoraWeights "
                "(a [in, r], b [r, out], 0-d scale)."
            )
        module = key_map(path)
        if not isinstance(module, str) or not module or module in layers:
            raise ConfigError(
                f"adapter {name!r}: key_map gave {module!r} for layer {path!r}; it must return "
                "a distinct non-empty module path per layer."
            )
        a, b = np.asarray(w.a), np.asarray(w.b)
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        tensors[peft_key(module, "A")] = np.ascontiguousarray(a.T)
        tensors[peft_key(module, "B")] = np.ascontiguousarray(b.T)
        layers[module] = (int(a.shape[1]), float(np.asarray(w.scale, np.float32)))
    return tensors, derive_config_dict(layers, **config_fields)


def _write_adapter(directory: Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    """One adapter's two files (not durable by themselves: `atomic_directory` fsyncs them)."""
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / ADAPTER_WEIGHTS_NAME, tensors, SAFETENSORS_METADATA)
    with open(directory / ADAPTER_CONFIG_NAME, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _holds_adapters(directory: Path) -> bool:
    """An adapter in `directory` or in one of its sub-directories (PEFT's layout)."""
    return (directory / ADAPTER_CONFIG_NAME).is_file() or any(
        (p / ADAPTER_CONFIG_NAME).is_file() for p in directory.iterdir() if p.is_dir()
    )


def save_peft(
    path: str | os.PathLike,
    adapters: Mapping,
    *,
    key_map: Callable[[str], str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: Any = None,
) -> None:
    """Write adapters in PEFT's layout so that PEFT (`PeftModel.from_pretrained`,
    `load_adapter`) and `jaxlora.io.load_peft` reproduce them (spec SW-IO-1, SW-IO-6).

    Arguments:
        path: the directory to create or replace (atomically, spec SW-IO-10).
        adapters: an `AdapterBank`, a mapping `name -> adapter`, or one adapter (saved as
            "default"). Names must be safe directory names.
        key_map: jaxlora path -> PEFT module path (prefix `base_model.model.` is added);
            default identity.
        base_model_name_or_path, task_type: written to `adapter_config.json` as PEFT does.
        dtype: cast the factors before writing; default: as held.

    The config's `r` / `lora_alpha` / `rank_pattern` / `alpha_pattern` are derived from each
    layer's rank and scale, so PEFT computes exactly the stored scale (`use_rslora` false).
    """
    target = Path(path)
    named = _as_named_adapters(adapters)
    for name in named:
        check_adapter_name(name)
    key_map = key_map or identity
    fields = {"base_model_name_or_path": base_model_name_or_path, "task_type": task_type}
    files = {
        name: _adapter_files(adapter, key_map, dtype, fields, name)
        for name, adapter in named.items()
    }
    check_replaceable(
        target, _holds_adapters, error=AdapterFormatError, what="an adapter", writer="save_peft"
    )
    with atomic_directory(target) as tmp:
        for name, (tensors, config) in files.items():
            _write_adapter(tmp if name == "default" else tmp / name, tensors, config)
