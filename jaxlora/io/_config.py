"""`adapter_config.json` <-> `jaxlora.LoraConfig`: parse, refuse what jaxlora cannot honour, derive.

Reading keeps the fields that change inference (`r`, `lora_alpha`, `use_rslora`,
`rank_pattern`, `alpha_pattern`, `target_modules`, `exclude_modules`), accepts PEFT's
inference-neutral fields, refuses features that would change the output (DoRA, `lora_bias`,
`bias != "none"`, `modules_to_save`, ...) with `UnsupportedFeatureError`, and drops unknown keys
with a warning (spec SW-IO-3, SW-IO-7). Writing derives `r`/`lora_alpha` and per-module
patterns from the stored ranks and scales so that PEFT reproduces every scale (SW-IO-6).

Example:
    >>> cfg = config_from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8}, "cfg.json")
    >>> cfg.r, cfg.scale_for("any.layer")
    (4, 2.0)
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import AdapterFormatError, ConfigError, UnsupportedFeatureError
from ..weights import LoraConfig

__all__ = ["config_from_dict", "derive_config_dict"]

#: Fields PEFT writes that do not change a LoRA forward at inference (accepted, not used).
_NEUTRAL = frozenset(
    {
        "auto_mapping", "base_model_name_or_path", "corda_config", "ensure_weight_tying",
        "eva_config", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_dropout", "lora_ga_config",
        "megatron_config", "megatron_core", "peft_type", "peft_version", "qalora_group_size",
        "revision", "runtime_config", "task_type",
    }
)  # fmt: skip
_USED = frozenset(
    {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
     "exclude_modules"}
)  # fmt: skip

_CONVERT = (
    "convert it in PEFT first, e.g. `model.merge_and_unload()` and save the merged model, or "
    "train a plain LoRA adapter"
)
#: field -> (is the feature in use?, what to do instead). Checked in this order.
_REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (lambda v: bool(v), f"DoRA changes the forward; {_CONVERT}"),
    "lora_bias": (lambda v: bool(v), f"a bias on lora_B changes the forward; {_CONVERT}"),
    "bias": (
        lambda v: v not in (None, "none"),
        f"trained base biases are not part of a LoRA adapter in jaxlora; {_CONVERT}",
    ),
    "modules_to_save": (
        lambda v: bool(v),
        "fully trained modules are not LoRA factors; load them into the base model's parameters "
        "yourself and remove the field",
    ),
    "trainable_token_indices": (lambda v: bool(v), f"trained embedding rows; {_CONVERT}"),
    "target_parameters": (lambda v: bool(v), f"LoRA on nn.Parameter (MoE experts); {_CONVERT}"),
    "layer_replication": (lambda v: bool(v), f"it rebuilds the base model; {_CONVERT}"),
    "alora_invocation_tokens": (
        lambda v: bool(v),
        f"activated LoRA is token dependent; {_CONVERT}",
    ),
    "use_qalora": (lambda v: bool(v), f"QA-LoRA pools the input; {_CONVERT}"),
    "use_bdlora": (lambda v: bool(v), f"block-diagonal LoRA has other shapes; {_CONVERT}"),
    "arrow_config": (lambda v: bool(v), f"Arrow routing changes the forward; {_CONVERT}"),
    "velora_config": (lambda v: bool(v), f"VeLoRA changes the forward; {_CONVERT}"),
    "kasa_config": (lambda v: bool(v), f"KaSA changes the forward; {_CONVERT}"),
    "monteclora_config": (lambda v: bool(v), f"MonteCLoRA changes the forward; {_CONVERT}"),
    "init_lora_weights": (
        lambda v: (
            (isinstance(v, str) and v.split("_")[0] in {"pissa", "olora", "corda", "loftq"})
            or v == "lora_ga"
        ),
        "this initialisation also changes the base weights, so the adapter alone is not the "
        "trained model; save it from PEFT with `save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...)` to get a plain LoRA adapter",
    ),
}


def config_from_dict(raw: Any, where: str) -> LoraConfig:
    """A `LoraConfig` from the parsed JSON of `adapter_config.json` at `where`.

    Raises `AdapterFormatError` for a malformed config and `UnsupportedFeatureError` for a
    feature jaxlora would have to ignore; warns about unknown keys, which are dropped.
    """
    if not isinstance(raw, Mapping):
        raise AdapterFormatError(
            f"{where}: expected a JSON object, got {type(raw).__name__}. Write the config with "
            "PEFT's save_pretrained or jaxlora.io.save_peft."
        )
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedFeatureError(
            f"{where}: peft_type={peft_type!r}; jaxlora reads LoRA adapters only "
            "(peft_type 'LORA'). Use PEFT itself for other adapter types."
        )
    for field, (in_use, fix) in _REFUSED.items():
        if field in raw and in_use(raw[field]):
            raise UnsupportedFeatureError(
                f"{where}: {field}={raw[field]!r} is not supported by jaxlora ({fix})."
            )
    unknown = sorted(set(raw) - _NEUTRAL - _USED - set(_REFUSED))
    if unknown:
        warnings.warn(
            f"{where}: dropping unknown adapter_config.json keys {unknown} (they are not part "
            "of the LoRA fields jaxlora knows; check the output if they change the forward).",
            UserWarning,
            stacklevel=3,
        )
    fields = {k: raw[k] for k in _USED if k in raw and raw[k] is not None}
    for name in ("rank_pattern", "alpha_pattern"):
        if name in fields and not isinstance(fields[name], Mapping):
            raise AdapterFormatError(
                f"{where}: {name} must be a JSON object, got {fields[name]!r}."
            )
    if not isinstance(fields.get("lora_alpha", 8), int | float) or isinstance(
        fields.get("lora_alpha"), bool
    ):
        raise AdapterFormatError(
            f"{where}: lora_alpha must be a number, got {fields['lora_alpha']!r}."
        )
    try:
        return LoraConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise AdapterFormatError(f"{where}: invalid LoRA config: {e}") from e


def _number(x: float) -> int | float:
    """`x` as an int when it is integral (PEFT writes ints), else as the exact float."""
    return int(x) if float(x).is_integer() else float(x)


def _alpha(scale: float, r: int) -> float:
    """The shortest decimal `alpha` with `float32(alpha / r) == float32(scale)` (SW-IO-14).

    Scales are stored in float32, so `scale * r` is rarely the alpha an adapter was made with
    (`16 / 3` comes back as `16.000000476837158`); the shortest decimal that gives the same
    stored scale is that alpha whenever the original had at most 8 significant digits.

    Example:
        >>> _alpha(float(np.float32(16 / 3)), 3)
        16.0
    """
    exact = float(scale) * int(r)
    target = np.float32(scale)
    for digits in range(1, 18):
        candidate = float(f"{exact:.{digits}g}")
        if np.float32(candidate / int(r)) == target:
            return candidate
    return exact


def _exact(path: str) -> str:
    """A pattern key matching exactly `path` under PEFT's `(.*\\.)?(key)$` rule: anchored with
    `^` so that it does not also match longer paths ending in `.path` (SW-IO-6)."""
    return "^" + re.escape(path)


def derive_config_dict(
    layers: Mapping[str, tuple[int, float]],
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """An `adapter_config.json` dict under which PEFT gives every module its rank and scale.

    Arguments:
        layers: PEFT module path -> (rank, scale).

    `r` is the most common rank, `lora_alpha` the most common `scale * rank`; modules that
    differ get an exact (escaped, `^`-anchored) key in `rank_pattern` / `alpha_pattern`.
    `use_rslora` is false, so PEFT's scale `lora_alpha / r` is exactly the stored scale.

    Example:
        >>> d = derive_config_dict({"m.q": (4, 2.0), "m.v": (2, 2.0)})
        >>> d["r"], d["lora_alpha"], d["rank_pattern"], d["alpha_pattern"]
        (4, 8, {'^m\\\\.v': 2}, {'^m\\\\.v': 4})
    """
    if not layers:
        raise ConfigError("cannot save an adapter with no layers: it targets nothing.")
    alphas = {path: _alpha(s, r) for path, (r, s) in layers.items()}
    r = Counter(int(r) for r, _ in layers.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": _number(alpha),
        "use_rslora": False,
        "target_modules": sorted(layers),
        "rank_pattern": {_exact(p): int(rk) for p, (rk, _) in layers.items() if rk != r},
        "alpha_pattern": {_exact(p): _number(a) for p, a in alphas.items() if a != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
