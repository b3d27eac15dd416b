"""`JaxLoraDriver`: jaxlora behind the Driver protocol, with jitted forwards.

jaxlora is functional, so the state the protocol asks for lives here: the base `DenseChain`,
an `AdapterBank`, its conformed copy (so every single-name selection shares one compilation,
SW-CONFORM-3), the active names and, while merged, the merged chain. Unmerge goes back to the
kept original (exact, SW-MERGE-2). float64 is declared only when `jax_enable_x64` is on.

Example:
    >>> import numpy as np
    >>> from jaxlora.reference import RefAdapter
    >>> d = JaxLoraDriver()
    >>> d.build([("l0", np.eye(2), np.zeros(2))], "float32")
    >>> d.add_adapter("a", RefAdapter(1, 2.0, {"l0": (np.ones((2, 1)), np.ones((1, 2)))}))
    >>> d.set_active("a")
    >>> d.forward(np.ones((1, 2))).tolist()
    [[5.0, 5.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from jaxlora.errors import (
    AdapterExistsError,
    ConfigError,
    JaxLoraError,
    ShapeMismatchError,
    TargetNotFoundError,
    format_names,
)
from jaxlora.reference import RefAdapter

from .reference import normalize_active

__all__ = ["JaxLoraDriver"]


class JaxLoraDriver:
    """jaxlora's `forward` / `forward_mixed` under `jax.jit`, `merge`, `combine`, `conform`."""

    name = "jaxlora"
    error_types = (JaxLoraError,)

    def __init__(self, rank_floor: int = 8) -> None:
        """`rank_floor`: conform every adapter to at least this rank, so that banks of small
        adapters share one compiled forward whatever their ranks (SW-CONFORM-1, SW-CONFORM-3)."""
        self.rank_floor = rank_floor
        dtypes = {"dtype:float32", "dtype:bfloat16"}
        if jax.config.jax_enable_x64:
            dtypes.add("dtype:float64")
        self.capabilities = frozenset(
            {
                "multi_active",
                "mixed",
                "merge",
                "safe_merge",
                "exact_unmerge",
                "combine_cat",
                "combine_linear",
                "combine_svd",
                "rslora",
                "patterns",
                "target_selection",
                "compile_count",
                *dtypes,
            }
        )

        # Function objects of this driver's own: jit caches per function, so compile_count()
        # counts this driver's compilations only (`jax.jit(jaxlora.forward)` would share them).
        def forward(model, x, lora):
            return jaxlora.forward(model, x, lora)

        def forward_mixed(model, x, lora):
            return jaxlora.forward(model, x, lora)

        self._forward = jax.jit(forward)
        self._forward_mixed = jax.jit(forward_mixed)
        self._dtype = jnp.float32
        self._model: jaxlora.DenseChain | None = None
        self._merged: jaxlora.DenseChain | None = None
        self._bank = jaxlora.AdapterBank()
        self._conformed = self._bank
        self._stacked: jaxlora.StackedBank | None = None
        self._active: tuple[str, ...] = ()

    def versions(self) -> dict[str, str]:
        return {"jaxlora": jaxlora.__version__, "jax": jax.__version__}

    def compile_count(self) -> int:
        return int(self._forward._cache_size())

    # -- model and bank ----------------------------------------------------------------------
    def build(self, layers, dtype: str) -> None:
        if f"dtype:{dtype}" not in self.capabilities:
            raise ConfigError(
                f"the jaxlora driver supports {sorted(self.capabilities)} dtypes, not {dtype!r}"
                " (float64 needs jax_enable_x64)."
            )
        self._dtype = jnp.dtype(dtype)
        self._model = jaxlora.DenseChain.from_layers({p: (w, c) for p, w, c in layers}, self._dtype)
        self._merged = None
        self._set_bank(jaxlora.AdapterBank())
        self._active = ()

    def _set_bank(self, bank: jaxlora.AdapterBank) -> None:
        self._bank = bank
        largest = max((w.rank for ad in bank.values() for w in ad.values()), default=0)
        self._conformed = jaxlora.conform(bank, max_rank=max(largest, self.rank_floor))
        self._stacked = None  # built lazily by forward_mixed

    def _to_adapter(self, name: str, adapter: RefAdapter) -> dict[str, jaxlora.LoraWeights]:
        shapes = self._model.layer_shapes()
        for path, (a, b) in adapter.weights.items():
            if path not in shapes:
                raise TargetNotFoundError(
                    f"adapter {name!r} targets {path!r}, which the model lacks. Layers: "
                    f"{format_names(shapes)}."
                )
            if (np.shape(a)[0], np.shape(b)[-1]) != shapes[path]:
                raise ShapeMismatchError(
                    f"adapter {name!r}, layer {path!r}: a{np.shape(a)} b{np.shape(b)} do not fit "
                    f"the kernel {shapes[path]}."
                )
        if adapter.fixed_scale is not None:
            scale = jnp.asarray(adapter.fixed_scale, jnp.float32)
            return {
                p: jaxlora.LoraWeights(
                    jnp.asarray(a, self._dtype), jnp.asarray(b, self._dtype), scale
                )
                for p, (a, b) in adapter.weights.items()
            }
        config = jaxlora.LoraConfig(
            r=int(adapter.r),
            lora_alpha=float(adapter.lora_alpha),
            use_rslora=bool(adapter.use_rslora),
            rank_pattern=dict(adapter.rank_pattern),
            alpha_pattern=dict(adapter.alpha_pattern),
        )
        return jaxlora.make_adapter(config, adapter.weights, dtype=self._dtype)

    def _require_new(self, name: str) -> None:
        if name in self._bank.names:
            raise AdapterExistsError(
                f"an adapter named {name!r} already exists. Names: "
                f"{format_names(self._bank.names)}. Delete it first."
            )

    def add_adapter(self, name: str, adapter: RefAdapter) -> None:
        self._require_new(name)  # checked first: a duplicate is not even converted
        self._set_bank(self._bank.add(name, self._to_adapter(name, adapter)))

    def delete_adapter(self, name: str) -> None:
        self._set_bank(self._bank.remove(name))
        self._active = tuple(n for n in self._active if n != name)

    def set_active(self, active) -> None:
        jaxlora.select(self._bank, active)  # raises on unknown or repeated names
        self._active = normalize_active(active, self._bank.names)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        x = jnp.asarray(x, self._dtype)
        if self._merged is not None:
            return np.asarray(self._forward(self._merged, x, None))
        active = jaxlora.select(self._conformed, self._active)
        return np.asarray(self._forward(self._model, x, active))

    def forward_mixed(self, x: np.ndarray, rows) -> np.ndarray:
        if len(rows) != np.shape(x)[0]:
            raise ShapeMismatchError(
                f"forward_mixed got {len(rows)} row names for a batch of {np.shape(x)[0]} rows; "
                "give one name (or None) per row."
            )
        if self._stacked is None:
            self._stacked = jaxlora.stack(self._conformed)
        routed = self._stacked.route(rows)  # raises on unknown names
        x = jnp.asarray(x, self._dtype)
        return np.asarray(self._forward_mixed(self._model, x, routed))

    # -- merge and combine -------------------------------------------------------------------
    def merge(self, safe: bool = False) -> None:
        named = {n: self._bank[n] for n in self._active}  # errors then name the adapter
        self._merged = jaxlora.merge(self._model, named, safe=safe)

    def unmerge(self) -> None:
        self._merged = None  # the kept original: an exact return (SW-MERGE-2)

    def combine(self, new_name, names, weights, method, svd_rank=None) -> None:
        self._require_new(new_name)
        combined = jaxlora.combine(self._bank, names, weights, method, svd_rank=svd_rank)
        self._set_bank(self._bank.add(new_name, combined))

    def base_kernels(self) -> dict[str, np.ndarray]:
        model = self._model if self._merged is None else self._merged
        return {p: np.array(k) for p, k in zip(model.paths, model.kernels, strict=True)}

    def select_targets(self, paths, target_modules, exclude_modules=None) -> list[str]:
        found = jaxlora.match_targets(target_modules, paths, exclude_modules)
        if not found:
            raise ConfigError(
                f"target_modules={target_modules!r} matches none of the layers "
                f"{format_names(paths)}."
            )
        return found
