"""Load PEFT LoRA adapters from disk into `LoraWeights` / an `AdapterBank` (spec SW-IO-1..9).

Example:
    >>> import jax.numpy as jnp, tempfile, jaxlora
    >>> w = jaxlora.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(0.5))
    >>> d = tempfile.mkdtemp() + "/ad"
    >>> save_peft(d, {"blocks.0.q": w})
    >>> bank = load_peft(d)
    >>> bank.names, bank["default"]["blocks.0.q"].a.shape
    (('default',), (4, 2))
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jax.numpy as jnp
import numpy as np

from ..bank import AdapterBank
from ..errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    format_names,
)
from ..lora import check_targets, check_weights
from ..params import get_kernel, kernel_paths
from ..weights import LoraConfig, LoraWeights, match_targets
from ._config import config_from_dict
from ._keys import check_adapter_name, identity, split_key
from ._names import ADAPTER_CONFIG_NAME, ADAPTER_PICKLE_NAMES, ADAPTER_WEIGHTS_NAME
from ._safetensors import read_tensors
from ._save import save_peft  # noqa: F401  (doctest above)

__all__ = ["find_adapters", "load_peft", "load_peft_adapter", "validate_against"]

#: How to rename an adapter's paths: every place named here exists (spec SW-CLI-3).
KEY_MAP_ADVICE = (
    "a key map that renames its module paths to the model's (`key_map=` of "
    "jaxlora.io.load_peft / load_peft_adapter; `--key-map OLD=NEW` of `jaxlora inspect` and "
    "`jaxlora generate`)"
)

LayerShapes = Mapping[str, tuple[int, int]]


def _read_config(directory: Path) -> LoraConfig:
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(
            f"{directory}: no {ADAPTER_CONFIG_NAME}. A PEFT adapter directory holds "
            f"{ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME} (PEFT's save_pretrained writes "
            "both)."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{path}: not valid JSON ({e}). Write it again.") from e
    except (ValueError, RecursionError) as e:  # >4300-digit integers, absurd nesting
        raise AdapterFormatError(
            f"{path}: JSON the loader refuses ({type(e).__name__}: {str(e)[:120]}); an adapter "
            "config is a flat object of small values."
        ) from None
    return config_from_dict(raw, str(path))


def _weights_file(directory: Path) -> Path:
    path = directory / ADAPTER_WEIGHTS_NAME
    if path.is_file():
        return path
    pickles = [n for n in ADAPTER_PICKLE_NAMES if (directory / n).is_file()]
    if pickles:
        raise AdapterFormatError(
            f"{directory}: only {pickles[0]} (a pickle) was found; jaxlora never unpickles "
            "files. Convert it in PEFT: `PeftModel.from_pretrained(base, dir)` then "
            f"`save_pretrained(dir, safe_serialization=True)` to write {ADAPTER_WEIGHTS_NAME}."
        )
    raise AdapterFormatError(
        f"{directory}: no {ADAPTER_WEIGHTS_NAME}; the adapter weights are missing."
    )


def _shapes_of(model: Any) -> dict[str, tuple[int, int]]:
    """`path -> (in, out)` from a layer-shape mapping, a DenseChain or a parameter tree."""
    if callable(getattr(model, "layer_shapes", None)):
        return dict(model.layer_shapes())
    if isinstance(model, Mapping) and all(
        isinstance(v, tuple | list) and len(v) == 2 and all(isinstance(n, int) for n in v)
        for v in model.values()
    ):
        return {p: (int(v[0]), int(v[1])) for p, v in model.items()}
    return {
        p: cast(tuple[int, int], tuple(get_kernel(model, p).shape)) for p in kernel_paths(model)
    }


def validate_against(
    adapter: Mapping[str, LoraWeights], model: Any, *, name: str = "adapter"
) -> None:
    """Check an adapter against a model's layers (spec SW-IO-9).

    Arguments:
        adapter: `path -> LoraWeights`.
        model: `path -> (in, out)`, a `jaxlora.DenseChain`, or a parameter tree with kernels.
        name: the adapter's name, for messages.

    Raises `TargetNotFoundError` listing every path the model lacks, and `ShapeMismatchError`
    when a layer's `(in, out)` differs from the adapter's.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(1.0))
        >>> validate_against({"l0": w}, {"l0": (4, 3)})
    """
    shapes = _shapes_of(model)
    check_targets(
        set(adapter),
        shapes,
        f"adapter {name!r}",
        fix=f"If it was saved for this model under other module names, load it with "
        f"{KEY_MAP_ADVICE}.",
    )
    for path, w in adapter.items():
        check_weights(w, where=f"adapter {name!r}, layer {path!r}", features=shapes[path])


def _factors(tensors: dict[str, np.ndarray], where: str) -> dict[str, dict[str, np.ndarray]]:
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, array in sorted(tensors.items()):  # safetensors' order is not stable
        module, which = split_key(key, where)
        if array.ndim != 2:
            raise AdapterFormatError(
                f"{where}: {key!r} has shape {array.shape}; LoRA factors are 2-d."
            )
        if which in modules.setdefault(module, {}):
            raise AdapterFormatError(f"{where}: module {module!r} has lora_{which} twice.")
        modules[module][which] = array
    if not modules:
        raise AdapterFormatError(f"{where}: the weights file holds no LoRA factors.")
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise AdapterFormatError(f"{where}: module {module!r} has no {lacking}.weight.")
    return modules


def load_peft_adapter(
    path: str | Path,
    *,
    key_map: Callable[[str], str] | None = None,
    dtype: Any = None,
    layer_shapes: Any = None,
    name: str = "adapter",
) -> tuple[dict[str, LoraWeights], LoraConfig]:
    """One PEFT adapter directory -> `(path -> LoraWeights, LoraConfig)`.

    Arguments:
        path: a directory with `adapter_config.json` and `adapter_model.safetensors`.
        key_map: PEFT module path (prefix `base_model.model.` removed) -> jaxlora path;
            default identity.
        dtype: cast the factors to this dtype; default: as stored (F64 becomes float32 unless
            `jax_enable_x64` is on, as for any JAX array).
        layer_shapes: optional model (see `validate_against`) to check the adapter against.
        name: the adapter's name, for messages.

    A is transposed (`lora_A.weight [r, in] -> a [in, r]`), B too (`[out, r] -> [r, out]`); rank
    and scale come from the config resolved against the *PEFT module path*, as PEFT does.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: no such adapter directory.")
    config = _read_config(directory)
    weights_path = _weights_file(directory)
    where = str(weights_path)
    modules = _factors(read_tensors(weights_path), where)
    key_map = key_map or identity
    if config.target_modules is not None:
        untargeted = [
            m
            for m in modules
            if not match_targets(config.target_modules, [m], config.exclude_modules)
        ]
        if untargeted:
            warnings.warn(
                f"{where}: modules {format_names(untargeted)} are not matched by target_modules="
                f"{config.target_modules!r}; PEFT would not load them, jaxlora does.",
                UserWarning,
                stacklevel=2,
            )
    adapter: dict[str, LoraWeights] = {}
    for module, pair in modules.items():
        a_t, b_t = pair["A"], pair["B"]
        rank = config.rank_for(module)
        if a_t.shape[0] != rank or b_t.shape[1] != rank:
            raise AdapterFormatError(
                f"{where}: module {module!r} has lora_A {a_t.shape} and lora_B {b_t.shape} "
                f"(rank {a_t.shape[0]}) but the config gives rank {rank} (r={config.r}, "
                f"rank_pattern={dict(config.rank_pattern)}). Config and weights do not belong "
                "together: fix r/rank_pattern or save the adapter again."
            )
        target = key_map(module)
        if not isinstance(target, str) or not target:
            raise AdapterFormatError(
                f"key_map returned {target!r} for module {module!r}; it must return a path."
            )
        if target in adapter:
            raise AdapterFormatError(f"key_map maps two modules to the same path {target!r}.")
        scale = jnp.asarray(config.scale_for(module), jnp.float32)
        adapter[target] = LoraWeights(
            jnp.asarray(a_t.T, dtype=dtype), jnp.asarray(b_t.T, dtype=dtype), scale
        )
    if layer_shapes is not None:
        validate_against(adapter, layer_shapes, name=name)
    return adapter, config


def find_adapters(path: str | Path) -> dict[str, Path]:
    """`name -> directory` of the adapters in a PEFT directory ("default" in the root)."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError(f"{root}: no such adapter directory.")
    found: dict[str, Path] = {}
    if (root / ADAPTER_CONFIG_NAME).is_file():
        found["default"] = root
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / ADAPTER_CONFIG_NAME).is_file():
            if sub.name in found:
                raise AdapterFormatError(
                    f"{root}: adapter 'default' is both in the root and in {sub}; keep one."
                )
            found[sub.name] = sub
    if not found:
        raise AdapterFormatError(
            f"{root}: no {ADAPTER_CONFIG_NAME} in the directory or its sub-directories; not a PEFT "
            "adapter directory."
        )
    return found


def load_peft(
    path: str | Path,
    *,
    key_map: Callable[[str], str] | None = None,
    dtype: Any = None,
    names: Sequence[str] | None = None,
    layer_shapes: Any = None,
) -> AdapterBank:
    """A PEFT adapter directory -> `AdapterBank` (spec SW-IO-1).

    The adapter in the root is named "default"; each `<path>/<name>/` holding an
    `adapter_config.json` is adapter `<name>`. See `load_peft_adapter` for the arguments;
    `names` selects a subset (unknown names raise `AdapterNotFoundError`).
    """
    found = find_adapters(path)
    wanted = list(found) if names is None else list(names)
    unknown = [n for n in wanted if n not in found]
    if unknown:
        raise AdapterNotFoundError(
            f"{path}: no adapter named {format_names(unknown)}. Found: {format_names(found)}."
        )
    bank = AdapterBank()
    for name in wanted:
        check_adapter_name(name)
        adapter, _ = load_peft_adapter(
            found[name], key_map=key_map, dtype=dtype, layer_shapes=layer_shapes, name=name
        )
        bank = bank.add(name, adapter)
    return bank
