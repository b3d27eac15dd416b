"""The switching spec (`specs/switching.md`) in plain NumPy: the oracle every test compares with.

Written from the spec text, clause by clause, independently of the JAX code; it imports no JAX
and computes in float64 unless told otherwise. Data are plain Python values:

- a model is a list of `(path, W [in, out], c [out])` (SW-MODEL-1);
- an adapter is a `RefAdapter`: a config (r, alpha, rsLoRA, patterns) plus `path -> (A, B)`.

Example:
    >>> import numpy as np
    >>> layers = [("l0", np.eye(2), np.zeros(2))]
    >>> ad = RefAdapter(r=1, lora_alpha=2.0, weights={"l0": (np.ones((2, 1)), np.ones((1, 2)))})
    >>> chain_forward(layers, np.ones((1, 2)), [ad]).tolist()
    [[5.0, 5.0]]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

T = TypeVar("T")

__all__ = [
    "TOLERANCE",
    "RefAdapter",
    "allclose",
    "chain_forward",
    "combine_cat",
    "combine_linear",
    "combine_svd",
    "layer_forward",
    "merge",
    "mixed_forward",
    "resolve",
    "scale",
    "targets",
    "tolerance",
    "unmerge",
]

Layers = list[tuple[str, np.ndarray, np.ndarray]]

#: SW-TOL-1: tol(d) per output dtype name.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """SW-SCALE-1 / SW-SCALE-2."""
    if use_rslora:
        return alpha / math.sqrt(r)
    return alpha / r


def resolve(pattern: Mapping[str, T], path: str, default: T) -> T:
    """SW-SCALE-3: the value of the first key whose `(.*\\.)?(key)$` re.match-es the path."""
    for key in pattern:
        if re.match(r"(.*\.)?(" + key + r")$", path) is not None:
            return pattern[key]
    return default


def targets(
    target_modules: str | Sequence[str],
    paths: Iterable[str],
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """SW-TARGET-1."""

    def hit(rule: str | Sequence[str] | None, path: str) -> bool:
        if rule is None:
            return False
        if isinstance(rule, str):
            if rule == "all-linear":
                return True
            return re.fullmatch(rule, path) is not None
        return any(path == name or path.endswith("." + name) for name in rule)

    return [p for p in paths if hit(target_modules, p) and not hit(exclude_modules, p)]


@dataclass
class RefAdapter:
    """An adapter as the spec describes it: a config plus `(A [in, r], B [r, out])` per path."""

    r: int
    lora_alpha: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    #: when set, every layer's scale (combinations have scale 1, SW-COMBINE-1..3)
    fixed_scale: float | None = None

    def rank_at(self, path: str) -> int:
        return int(resolve(self.rank_pattern, path, self.r))

    def scale_at(self, path: str) -> float:
        """SW-SCALE-1..3 for the layer at `path`."""
        if self.fixed_scale is not None:
            return self.fixed_scale
        alpha = float(resolve(self.alpha_pattern, path, self.lora_alpha))
        return scale(alpha, self.rank_at(path), self.use_rslora)

    def terms(self, path: str, dtype=np.float64) -> tuple[np.ndarray, np.ndarray, float] | None:
        """`(A, B, s)` at `path` as `dtype` arrays, or None when the layer is not targeted."""
        if path not in self.weights:
            return None
        a, b = self.weights[path]
        return np.asarray(a, dtype), np.asarray(b, dtype), self.scale_at(path)


def layer_forward(x, w, c, terms: Sequence[tuple], dtype=np.float64) -> np.ndarray:
    """SW-FORWARD-1: `x W + c + Σ s_i (x A_i) B_i`, deltas added left to right."""
    x = np.asarray(x, dtype)
    y = x @ np.asarray(w, dtype) + np.asarray(c, dtype)
    for a, b, s in terms:
        y = y + ((x @ a) @ b) * s
    return y


def chain_forward(layers: Layers, x, active: Sequence[RefAdapter], dtype=np.float64) -> np.ndarray:
    """SW-MODEL-1 with the active adapters in order (SW-ACTIVE-1, SW-FORWARD-2)."""
    h = np.asarray(x, dtype)
    for i, (path, w, c) in enumerate(layers):
        terms = [t for t in (ad.terms(path, dtype) for ad in active) if t is not None]
        h = layer_forward(h, w, c, terms, dtype)
        if i < len(layers) - 1:
            h = np.tanh(h)
    return h


def mixed_forward(
    layers: Layers, x, rows: Sequence[RefAdapter | None], dtype=np.float64
) -> np.ndarray:
    """SW-MIXED-1: every row through the chain with its own adapter (None: base)."""
    x = np.asarray(x, dtype)
    if len(rows) != x.shape[0]:
        raise ValueError(f"{len(rows)} row names for a batch of {x.shape[0]} rows")
    out = [
        chain_forward(layers, x[i : i + 1], [] if ad is None else [ad], dtype)
        for i, ad in enumerate(rows)
    ]
    return np.concatenate(out, axis=0)


def merge(layers: Layers, active: Sequence[RefAdapter], dtype=np.float64) -> Layers:
    """SW-MERGE-1: new layers with `W + Σ s_i A_i B_i`; the input list is not modified."""
    merged = []
    for path, w, c in layers:
        w_new = np.array(w, dtype=dtype, copy=True)
        for ad in active:
            t = ad.terms(path, dtype)
            if t is not None:
                w_new = w_new + t[2] * (t[0] @ t[1])
        merged.append((path, w_new, np.array(c, dtype=dtype, copy=True)))
    return merged


def unmerge(layers: Layers, active: Sequence[RefAdapter], dtype=np.float64) -> Layers:
    """SW-MERGE-3: subtract the same deltas."""
    out = []
    for path, w, c in layers:
        w_new = np.array(w, dtype=dtype, copy=True)
        for ad in active:
            t = ad.terms(path, dtype)
            if t is not None:
                w_new = w_new - t[2] * (t[0] @ t[1])
        out.append((path, w_new, np.array(c, dtype=dtype, copy=True)))
    return out


def _paths_in_order(adapters: Sequence[RefAdapter]) -> list[str]:
    seen: list[str] = []
    for ad in adapters:
        for p in ad.weights:
            if p not in seen:
                seen.append(p)
    return seen


def _as_scale_one(weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> RefAdapter:
    """A combination result: scale 1 at every layer."""
    rank = max(a.shape[1] for a, _ in weights.values())
    return RefAdapter(r=rank, lora_alpha=float(rank), weights=weights, fixed_scale=1.0)


def combine_cat(adapters: Sequence[RefAdapter], weights: Sequence[float]) -> RefAdapter:
    """SW-COMBINE-1."""
    out = {}
    for path in _paths_in_order(adapters):
        a_parts, b_parts = [], []
        for ad, wt in zip(adapters, weights, strict=True):
            t = ad.terms(path)
            if t is not None:
                a_parts.append(wt * t[2] * t[0])
                b_parts.append(t[1])
        out[path] = (np.concatenate(a_parts, axis=1), np.concatenate(b_parts, axis=0))
    return _as_scale_one(out)


def combine_linear(adapters: Sequence[RefAdapter], weights: Sequence[float]) -> RefAdapter:
    """SW-COMBINE-2 (raises ValueError on unequal ranks)."""
    out = {}
    for path in _paths_in_order(adapters):
        ranks = {ad.weights[path][0].shape[1] for ad in adapters if path in ad.weights}
        if len(ranks) > 1:
            raise ValueError(f"linear needs equal ranks at {path}: {sorted(ranks)}")
        a_new = b_new = None
        for ad, wt in zip(adapters, weights, strict=True):
            t = ad.terms(path)
            if t is None:
                continue
            ci = wt * t[2]
            a_i = math.copysign(math.sqrt(abs(ci)), ci) * t[0] if ci != 0 else 0.0 * t[0]
            b_i = math.sqrt(abs(ci)) * t[1]
            a_new = a_i if a_new is None else a_new + a_i
            b_new = b_i if b_new is None else b_new + b_i
        out[path] = (a_new, b_new)
    return _as_scale_one(out)


def combine_svd(
    adapters: Sequence[RefAdapter], weights: Sequence[float], rank: int | None = None
) -> RefAdapter:
    """SW-COMBINE-3: truncated SVD of the exact weighted sum."""
    out = {}
    for path in _paths_in_order(adapters):
        d = None
        ranks = []
        for ad, wt in zip(adapters, weights, strict=True):
            t = ad.terms(path)
            if t is not None:
                ranks.append(t[0].shape[1])
                term = wt * t[2] * (t[0] @ t[1])
                d = term if d is None else d + term
        assert d is not None  # _paths_in_order lists only paths some adapter targets
        k = min(rank if rank is not None else max(ranks), *d.shape)
        u, s, vt = np.linalg.svd(d, full_matrices=False)
        out[path] = (u[:, :k] * s[:k], vt[:k])
    return _as_scale_one(out)


def tolerance(dtype_name: str) -> float:
    """SW-TOL-1: tol(d) for an output dtype name (`"float32"`, `"bfloat16"`, ...)."""
    return TOLERANCE[str(dtype_name)]


def allclose(y, y_ref, dtype_name: str) -> tuple[bool, float, float]:
    """SW-TOL-1: `(ok, max error, allowed)` for output `y` of dtype `dtype_name` vs the oracle."""
    y = np.asarray(y, dtype=np.float64)
    y_ref = np.asarray(y_ref, dtype=np.float64)
    if y.shape != y_ref.shape:
        return False, math.inf, 0.0
    err = float(np.max(np.abs(y - y_ref))) if y.size else 0.0
    if not np.all(np.isfinite(y)) or math.isnan(err):
        return False, math.inf, 0.0
    allowed = tolerance(dtype_name) * (1.0 + (float(np.max(np.abs(y_ref))) if y.size else 0.0))
    return err <= allowed, err, allowed
