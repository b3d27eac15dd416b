"""`ReferenceDriver`: the NumPy oracle (`jaxlora.reference`) behind the Driver protocol.

A stateful wrapper, as PEFT is: it holds copies of the base layers, the adapters and the active
set, and evaluates everything with `jaxlora.reference` in the model dtype (float64 or float32).
It is the suite's sanity check: whatever fails here is a bug in the suite, not in a library.

Example:
    >>> import numpy as np
    >>> from jaxlora.reference import RefAdapter
    >>> d = ReferenceDriver()
    >>> d.build([("l0", np.eye(2), np.zeros(2))], "float64")
    >>> d.add_adapter("a", RefAdapter(1, 2.0, {"l0": (np.ones((2, 1)), np.ones((1, 2)))}))
    >>> d.set_active("a")
    >>> d.forward(np.ones((1, 2))).tolist()
    [[5.0, 5.0]]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from jaxlora import reference
from jaxlora.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    NonFiniteError,
    ShapeMismatchError,
    TargetNotFoundError,
    format_names,
)
from jaxlora.reference import RefAdapter

__all__ = ["ReferenceDriver", "normalize_active"]

_COMBINERS = {
    "cat": lambda ads, ws, k: reference.combine_cat(ads, ws),
    "linear": lambda ads, ws, k: reference.combine_linear(ads, ws),
    "svd": lambda ads, ws, k: reference.combine_svd(ads, ws, k),
}


def normalize_active(active: str | Sequence[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    """Validate an active set (SW-ACTIVE-1, SW-ACTIVE-3) against the `known` names.

    Example:
        >>> normalize_active("a", ["a", "b"]), normalize_active(None, [])
        (('a',), ())
    """
    names = () if active is None else (active,) if isinstance(active, str) else tuple(active)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"the active set lists {format_names(duplicates)} more than once.")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterNotFoundError(
            f"no adapter named {unknown[0]!r}. Existing adapters: {format_names(known)}."
        )
    return names


def _validate_config(name: str, adapter: RefAdapter) -> None:
    """SW-CONFIG-1: positive rank, finite alpha, pattern keys that are valid regexes."""
    alphas = [adapter.lora_alpha, *adapter.alpha_pattern.values()]
    if adapter.fixed_scale is None and not all(math.isfinite(a) for a in alphas):
        raise ConfigError(f"adapter {name!r}: lora_alpha / alpha_pattern must be finite: {alphas}.")
    ranks = [adapter.r, *adapter.rank_pattern.values()]
    if not all(isinstance(r, int | np.integer) and r > 0 for r in ranks):
        raise ConfigError(f"adapter {name!r}: r / rank_pattern must be positive ints: {ranks}.")
    for field_name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(adapter, field_name):
            try:
                re.compile(key)
            except re.error as e:
                raise ConfigError(
                    f"adapter {name!r}: {field_name} key {key!r} is not a valid regex ({e})."
                ) from None


class ReferenceDriver:
    """The oracle as a driver (float64 and float32; every capability of the spec)."""

    name = "reference"
    capabilities = frozenset(
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
            "dtype:float64",
            "dtype:float32",
        }
    )

    def __init__(self) -> None:
        self._dtype = np.float64
        self._layers: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._merged: list[tuple[str, np.ndarray, np.ndarray]] | None = None
        self._adapters: dict[str, RefAdapter] = {}
        self._active: tuple[str, ...] = ()

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    # -- model and bank ----------------------------------------------------------------------
    def build(self, layers, dtype: str) -> None:
        if f"dtype:{dtype}" not in self.capabilities:
            raise ConfigError(f"the reference driver computes in float64/float32, not {dtype!r}.")
        self._dtype = np.dtype(dtype)
        self._layers = [
            (p, np.array(w, self._dtype), np.array(c, self._dtype)) for p, w, c in layers
        ]
        self._merged = None
        self._adapters = {}
        self._active = ()

    def add_adapter(self, name: str, adapter: RefAdapter) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"adapter names must be non-empty strings (SW-BANK-4), got {name!r}.")
        if name in self._adapters:
            raise AdapterExistsError(
                f"an adapter named {name!r} already exists. Existing adapters: "
                f"{format_names(self._adapters)}. Delete it first."
            )
        _validate_config(name, adapter)
        shapes = {p: w.shape for p, w, _ in self._layers}
        for path, (a, b) in adapter.weights.items():
            if path not in shapes:
                raise TargetNotFoundError(
                    f"adapter {name!r} targets {path!r}, which the model lacks. Layers: "
                    f"{format_names(shapes)}."
                )
            if (np.shape(a)[0], np.shape(b)[1]) != shapes[path]:
                raise ShapeMismatchError(
                    f"adapter {name!r}, layer {path!r}: a{np.shape(a)} b{np.shape(b)} do not fit "
                    f"the kernel {shapes[path]}."
                )
        self._adapters[name] = RefAdapter(  # this module's RefAdapter: its own scaling rules
            r=adapter.r,
            lora_alpha=adapter.lora_alpha,
            weights={
                p: (np.array(a, self._dtype), np.array(b, self._dtype))
                for p, (a, b) in adapter.weights.items()
            },
            use_rslora=adapter.use_rslora,
            rank_pattern=dict(adapter.rank_pattern),
            alpha_pattern=dict(adapter.alpha_pattern),
            fixed_scale=adapter.fixed_scale,
        )

    def delete_adapter(self, name: str) -> None:
        normalize_active(name, list(self._adapters))
        del self._adapters[name]
        self._active = tuple(n for n in self._active if n != name)

    def set_active(self, active) -> None:
        self._active = normalize_active(active, list(self._adapters))

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: np.ndarray) -> np.ndarray:
        if self._merged is not None:
            return reference.chain_forward(self._merged, x, [], self._dtype)
        active = [self._adapters[n] for n in self._active]
        return reference.chain_forward(self._layers, x, active, self._dtype)

    def forward_mixed(self, x: np.ndarray, rows) -> np.ndarray:
        if len(rows) != np.shape(x)[0]:
            raise ShapeMismatchError(
                f"forward_mixed got {len(rows)} row names for a batch of {np.shape(x)[0]} rows; "
                "give one name (or None) per row."
            )
        for row in rows:
            if row is not None:
                normalize_active(row, list(self._adapters))
        ads = [None if r is None else self._adapters[r] for r in rows]
        return reference.mixed_forward(self._layers, x, ads, self._dtype)

    # -- merge and combine -------------------------------------------------------------------
    def merge(self, safe: bool = False) -> None:
        active = [self._adapters[n] for n in self._active]
        if safe:
            for name, ad in zip(self._active, active, strict=True):
                for path in ad.weights:
                    a, b, s = ad.terms(path)
                    if not np.all(np.isfinite(s * (a @ b))):
                        raise NonFiniteError(
                            f"adapter {name!r}, layer {path!r}: the delta has NaN/Inf; nothing "
                            "was merged."
                        )
        self._merged = reference.merge(self._layers, active, self._dtype)

    def unmerge(self) -> None:
        self._merged = None

    def combine(self, new_name, names, weights, method, svd_rank=None) -> None:
        if new_name in self._adapters:
            raise AdapterExistsError(f"an adapter named {new_name!r} already exists.")
        if method not in _COMBINERS:
            raise ConfigError(f"unknown method {method!r}; choose one of {sorted(_COMBINERS)}.")
        ads = [self._adapters[n] for n in normalize_active(list(names), list(self._adapters))]
        self.add_adapter(new_name, _COMBINERS[method](ads, list(weights), svd_rank))

    def base_kernels(self) -> dict[str, np.ndarray]:
        layers = self._layers if self._merged is None else self._merged
        return {p: w.copy() for p, w, _ in layers}

    def select_targets(self, paths, target_modules, exclude_modules=None) -> list[str]:
        found = reference.targets(target_modules, paths, exclude_modules)
        if not found:
            raise ConfigError(
                f"target_modules={target_modules!r} matches none of the layers "
                f"{format_names(paths)}."
            )
        return found
