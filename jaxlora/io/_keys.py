"""PEFT safetensors keys <-> module paths, and adapter names that are safe as directory names.

A PEFT key is `base_model.model.<module path>.lora_A.weight` (or `.lora_B.weight`); loaders also
accept it without the `base_model.model.` prefix. The module path is the torch module's dotted
name; with the usual transformers naming it is also the jaxlora path (spec SW-IO-2).

Example:
    >>> split_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "f")
    ('model.layers.0.self_attn.q_proj', 'A')
    >>> peft_key("model.layers.0.self_attn.q_proj", "B")
    'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..errors import AdapterFormatError, ConfigError, UnsupportedFeatureError
from ._names import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

__all__ = [
    "PEFT_PREFIX",
    "check_adapter_name",
    "identity",
    "peft_key",
    "prefix_key_map",
    "split_key",
]

PEFT_PREFIX = "base_model.model."

#: names that would collide with the files of the root adapter
_RESERVED = frozenset({ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, "README.md"})

_UNSUPPORTED_PARTS = {
    "lora_embedding_A": "LoRA on embedding layers",
    "lora_embedding_B": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA (use_dora)",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "trainable_tokens": "trainable_token_indices",
}


def identity(path: str) -> str:
    """The default key map: the PEFT module path is the jaxlora path."""
    return path


def prefix_key_map(renames: Mapping[str, str]) -> Callable[[str], str]:
    """A key map that renames path prefixes: the longest `old` a path starts with becomes `new`;
    other paths are unchanged (`jaxlora inspect` / `generate --key-map OLD=NEW`).

    Example:
        >>> km = prefix_key_map({"layers.": "model.layers.", "": "x."})
        >>> km("layers.0.mlp.up_proj"), km("lm_head")
        ('model.layers.0.mlp.up_proj', 'x.lm_head')
    """
    for old, new in dict(renames).items():
        if not isinstance(old, str) or not isinstance(new, str):
            raise ConfigError(f"prefix_key_map: prefixes must be strings, got {old!r} -> {new!r}.")
    pairs = sorted(dict(renames).items(), key=lambda kv: -len(kv[0]))

    def key_map(path: str) -> str:
        for old, new in pairs:
            if path.startswith(old):
                return new + path[len(old) :]
        return path

    return key_map


def split_key(key: str, where: str) -> tuple[str, str]:
    """`(module path, "A" | "B")` of a PEFT key, prefix `base_model.model.` removed.

    Raises `UnsupportedFeatureError` for embedding LoRA, DoRA, lora_bias and modules_to_save
    entries, and `AdapterFormatError` for any other key that is not a LoRA factor.
    """
    for part, feature in _UNSUPPORTED_PARTS.items():
        if f".{part}" in f".{key}":
            raise UnsupportedFeatureError(
                f"{where}: key {key!r} belongs to {feature}, which jaxlora does not support. "
                "Save a plain LoRA adapter from PEFT (without that feature), or merge it into "
                "the base model with PEFT's merge_and_unload()."
            )
    module = key.removeprefix(PEFT_PREFIX)
    for which in ("A", "B"):
        suffix = f".lora_{which}.weight"
        if module.endswith(suffix) and len(module) > len(suffix):
            return module[: -len(suffix)], which
    if module.endswith(".lora_B.bias"):
        raise UnsupportedFeatureError(
            f"{where}: key {key!r} is a lora_B bias (lora_bias=True), which jaxlora does not "
            "support. Train without lora_bias or merge the adapter in PEFT."
        )
    raise AdapterFormatError(
        f"{where}: key {key!r} is not a LoRA factor; expected "
        f"'{PEFT_PREFIX}<module path>.lora_A.weight' or '.lora_B.weight' (PEFT's "
        "save_pretrained format, adapter name removed)."
    )


def peft_key(module_path: str, which: str) -> str:
    """The PEFT key of factor `which` ("A" or "B") of the module at `module_path`."""
    return f"{PEFT_PREFIX}{module_path}.lora_{which}.weight"


def check_adapter_name(name: object) -> str:
    """`name` if it is safe as a directory name next to the root adapter, else `ConfigError`."""
    if (
        not isinstance(name, str)
        or not name
        or name in {".", ".."}
        or name.startswith(".")
        or any(c in name for c in ("/", "\\", "\0", ":"))
        or name in _RESERVED
    ):
        raise ConfigError(
            f"adapter name {name!r} is not safe as a directory name (PEFT stores adapter "
            "'<name>' in '<dir>/<name>/'): use a non-empty name without path separators, "
            "':' or a leading '.', e.g. 'math_v2'."
        )
    return name
