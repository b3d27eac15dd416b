"""`LoraWeights` (one targeted layer), `LoraConfig` (PEFT field names) and scaling rules.

Orientation is JAX/Flax's (`y = x @ kernel`): `a` is `[in, r]`, `b` is `[r, out]`, and the
delta of one layer is `scale * (x @ a) @ b` (spec SW-NOTATION-1, SW-FORWARD-1). PEFT stores the
transposes; `jaxlora.io` converts.

Example:
    >>> import jax, jaxlora
    >>> cfg = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["q"])
    >>> adapter = jaxlora.init_adapter(jax.random.key(0), cfg, {"blocks.0.q": (16, 16)})
    >>> adapter["blocks.0.q"].a.shape, float(adapter["blocks.0.q"].scale)
    ((16, 4), 2.0)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import ConfigError, ShapeMismatchError, UnsupportedFeatureError, format_names
from .types import LoraWeights

__all__ = [
    "LoraConfig",
    "init_adapter",
    "make_adapter",
    "match_targets",
    "resolve_pattern",
    "scaling",
]

Array = jax.Array


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The LoRA scale (spec SW-SCALE-1, SW-SCALE-2): `alpha / r`, or `alpha / sqrt(r)`.

    Example:
        >>> scaling(16, 4), scaling(16, 4, use_rslora=True)
        (4.0, 8.0)
    """
    if r <= 0:
        raise ConfigError(f"`r` must be a positive integer, got r={r!r}.")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def resolve_pattern(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup (spec SW-SCALE-3).

    The first key `k`, in the mapping's order, for which `re.match(rf"(.*\\.)?({k})$", path)`
    matches gives the value; otherwise `default`.

    Example:
        >>> resolve_pattern({"q": 2, "blocks.1.v": 8}, "blocks.1.v", 4)
        8
    """
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def match_targets(
    target_modules: str | Sequence[str] | None,
    paths: Iterable[str],
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """The layer paths an adapter targets, as PEFT selects them (spec SW-TARGET-1).

    A string is a regex that must match the whole path (`re.fullmatch`); a list of names matches
    a path equal to a name or ending in `"." + name`. `"all-linear"` (PEFT's shorthand) targets
    every path. `exclude_modules` removes paths with the same rules.

    Example:
        >>> match_targets(["q", "v"], ["blocks.0.q", "blocks.0.k", "blocks.0.v"])
        ['blocks.0.q', 'blocks.0.v']
    """
    paths = list(paths)

    def matches(spec: str | Sequence[str] | None, path: str) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return spec == "all-linear" or re.fullmatch(spec, path) is not None
        return any(path == t or path.endswith("." + t) for t in spec)

    if target_modules is None:
        raise ConfigError(
            "`target_modules` is None: say which layers to adapt, e.g. "
            "LoraConfig(target_modules=['q_proj', 'v_proj']) or a regex string."
        )
    return [p for p in paths if matches(target_modules, p) and not matches(exclude_modules, p)]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters under PEFT's field names.

    Only fields that change inference are honoured at inference; `lora_dropout` (in `[0, 1)`)
    is the identity there (spec SW-FORWARD-1) and is applied by `jaxlora.train` in training
    (SW-TRAIN-3). `init_lora_weights` is PEFT's: `True` (A Kaiming-uniform, B zero),
    `"gaussian"` (A normal with std `1/r`, B zero) or `False` (both random) (SW-TRAIN-2).

    Example:
        >>> cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"v": 4})
        >>> cfg.rank_for("blocks.0.v"), cfg.scale_for("blocks.0.v")
        (4, 4.0)
    """

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lora_dropout: float = 0.0
    init_lora_weights: bool | str = True
    bias: str = "none"
    use_dora: bool = False
    lora_bias: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int | np.integer) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"LoraConfig: `r` must be a positive integer, got r={self.r!r}.")
        if not _is_finite_number(self.lora_alpha):
            raise ConfigError(
                f"LoraConfig: `lora_alpha` must be a finite number, got {self.lora_alpha!r}."
            )
        for field_name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, field_name)
            if not isinstance(pattern, Mapping) or not all(isinstance(k, str) for k in pattern):
                raise ConfigError(
                    f"LoraConfig: `{field_name}` must map module-name patterns (str) to values, "
                    f"got {pattern!r}. Example: {field_name}={{'v_proj': 4}}."
                )
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value <= 0:
                raise ConfigError(
                    f"LoraConfig: rank_pattern[{key!r}] must be a positive integer, got {value!r}."
                )
        for key, value in self.alpha_pattern.items():
            if not _is_finite_number(value):
                raise ConfigError(
                    f"LoraConfig: alpha_pattern[{key!r}] must be a finite number, got {value!r}."
                )
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                _check_regex(f"{field_name} key", key)
        for field_name in ("target_modules", "exclude_modules"):
            value = getattr(self, field_name)
            _check_module_names(field_name, value)
            if isinstance(value, str) and value != "all-linear":
                _check_regex(field_name, value)
        if not isinstance(self.init_lora_weights, bool) and self.init_lora_weights != "gaussian":
            raise ConfigError(
                f"LoraConfig: `init_lora_weights` must be True, False or 'gaussian', got "
                f"{self.init_lora_weights!r} (PEFT's other schemes change the base weights)."
            )
        if not _is_finite_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                f"LoraConfig: `lora_dropout` must be a probability in [0, 1), got "
                f"{self.lora_dropout!r}."
            )
        refused = {
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "bias": self.bias != "none",
        }
        for field_name, is_set in refused.items():
            if is_set:
                raise UnsupportedFeatureError(
                    f"LoraConfig: {field_name}={getattr(self, field_name)!r} is not supported by "
                    "jaxlora (spec SW-CONFIG-1); it would change the forward, so it is refused "
                    f"rather than ignored. Use an adapter trained without {field_name}, or "
                    "merge it with PEFT first."
                )
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, list):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))

    def rank_for(self, path: str) -> int:
        """The rank of the layer at `path` (rank_pattern, else `r`)."""
        return int(resolve_pattern(self.rank_pattern, path, self.r))

    def alpha_for(self, path: str) -> float:
        """The alpha of the layer at `path` (alpha_pattern, else `lora_alpha`)."""
        return float(resolve_pattern(self.alpha_pattern, path, self.lora_alpha))

    def scale_for(self, path: str) -> float:
        """The scale of the layer at `path` (spec SW-SCALE-1..3)."""
        return scaling(self.alpha_for(path), self.rank_for(path), self.use_rslora)


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


#: Longest regex accepted from a config: backtracking cost grows polynomially with length.
MAX_PATTERN_LENGTH = 1000


def _repeats_nest(items: Any, inside: bool = False) -> bool:
    """Whether a parsed regex has a repeat inside a repeat, or alternatives inside a repeat:
    the shapes (`(a+)+`, `(a|aa)*`) whose backtracking takes exponential time."""
    # CPython's own regex parser (3.11+): the only parser that reads a pattern exactly as `re`.
    from re import _constants as c  # pyright: ignore[reportAttributeAccessIssue]

    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            _, high, sub = av
            many = high > 1
            if (inside and many) or _repeats_nest(sub, inside or many):
                return True
        elif op is c.BRANCH:
            if inside and len(av[1]) > 1:
                return True
            if any(_repeats_nest(branch, inside) for branch in av[1]):
                return True
        elif op is c.SUBPATTERN:
            if _repeats_nest(av[-1], inside):
                return True
        elif op in (c.ASSERT, c.ASSERT_NOT) and _repeats_nest(av[1], inside):
            return True
    return False


def _check_regex(what: str, pattern: str) -> None:
    """A valid regex that cannot backtrack exponentially (spec SW-SAFE-1, SW-CONFIG-1)."""
    from re import _parser  # pyright: ignore[reportAttributeAccessIssue] (see _repeats_nest)

    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ConfigError(
            f"LoraConfig: {what} is {len(pattern)} characters long; at most "
            f"{MAX_PATTERN_LENGTH} are accepted. Use a list of module names instead."
        )
    try:
        parsed = _parser.parse(pattern)
    except re.error as err:
        raise ConfigError(
            f"LoraConfig: {what} {pattern!r} is not a valid regular expression ({err}). "
            "Escape literal dots and brackets, e.g. r'blocks\\.0\\.q'."
        ) from None
    if _repeats_nest(parsed.data):
        raise ConfigError(
            f"LoraConfig: {what} {pattern!r} repeats a group that itself repeats or has "
            "alternatives (like '(a+)+' or '(a|b)*'); such patterns can take exponential time "
            "and are refused. Rewrite it without nesting, e.g. '.*\\.(q_proj|v_proj)'."
        )


def _check_module_names(what: str, value: Any) -> None:
    """`target_modules` / `exclude_modules`: None, a regex string, or a list of names."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
        return
    raise ConfigError(
        f"LoraConfig: `{what}` must be a regex string or a list of module names (non-empty "
        f"strings), got {value!r}. Example: {what}=['q_proj', 'v_proj']."
    )


def make_adapter(
    config: LoraConfig,
    factors: Mapping[str, tuple[Any, Any]],
    *,
    dtype: Any = None,
) -> dict[str, LoraWeights]:
    """Build an adapter from raw `(a [in, r], b [r, out])` pairs and a config.

    The scale of each path comes from `config` (patterns included); each `a`'s rank must equal
    the config's rank for that path.

    Example:
        >>> import numpy as np
        >>> cfg = LoraConfig(r=2, lora_alpha=4)
        >>> ad = make_adapter(cfg, {"l0": (np.ones((3, 2)), np.ones((2, 3)))})
        >>> float(ad["l0"].scale)
        2.0
    """
    adapter = {}
    for path, (a, b) in factors.items():
        a = jnp.asarray(a, dtype=dtype)
        b = jnp.asarray(b, dtype=dtype)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ShapeMismatchError(
                f"layer {path!r}: expected a [in, r] and b [r, out], got a{tuple(a.shape)} and "
                f"b{tuple(b.shape)}. PEFT's lora_A.weight is [r, in]: transpose it (or use "
                "jaxlora.io.load_peft)."
            )
        want = config.rank_for(path)
        if a.shape[1] != want:
            raise ShapeMismatchError(
                f"layer {path!r}: the config gives rank {want} (r={config.r}, rank_pattern="
                f"{dict(config.rank_pattern)}) but a has shape {tuple(a.shape)} (rank "
                f"{a.shape[1]}). Fix the config's r/rank_pattern or the arrays."
            )
        adapter[path] = LoraWeights(a, b, jnp.asarray(config.scale_for(path), jnp.float32))
    return adapter


def init_adapter(
    key: Array,
    config: LoraConfig,
    layer_shapes: Mapping[str, tuple[int, int]],
    *,
    dtype: Any = jnp.float32,
) -> dict[str, LoraWeights]:
    """A fresh adapter for the layers of `layer_shapes` (`path -> (in, out)`) that `config` targets.

    `a` is PEFT's `kaiming_uniform_(a=sqrt(5))` of its `[r, in]` weight, i.e. uniform in
    `±1/sqrt(in)` (`init_lora_weights="gaussian"`: normal with std `1/r`); `b` is zero when
    `config.init_lora_weights` is true or "gaussian" (a fresh adapter is then a no-op) and small
    random when it is False (spec SW-TRAIN-2).

    Example:
        >>> import jax
        >>> cfg = LoraConfig(r=2, target_modules="l[01]")
        >>> sorted(init_adapter(jax.random.key(0), cfg, {"l0": (4, 4), "l2": (4, 4)}))
        ['l0']
    """
    targets = match_targets(config.target_modules, layer_shapes, config.exclude_modules)
    if not targets:
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches none of the layers: "
            f"{format_names(layer_shapes)}."
        )
    factors = {}
    for i, path in enumerate(targets):
        d_in, d_out = layer_shapes[path]
        r = config.rank_for(path)
        ka, kb = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / math.sqrt(d_in)
        if config.init_lora_weights == "gaussian":
            a = jax.random.normal(ka, (d_in, r), dtype) / r
        else:
            a = jax.random.uniform(ka, (d_in, r), dtype, -bound, bound)
        if config.init_lora_weights:
            b = jnp.zeros((r, d_out), dtype)
        else:
            b = jax.random.normal(kb, (r, d_out), dtype) / math.sqrt(r)
        factors[path] = (a, b)
    return make_adapter(config, factors, dtype=dtype)
