"""Deliberately broken drivers: each must be caught by the conformance suite, with its clause.

Used by `tests/test_conformance_broken.py`. Each class breaks one rule of `specs/switching.md`
the way real LoRA libraries have (wrong scales, pattern keys matched as plain suffixes, a target
regex that only has to match a prefix, names with dots refused, leaking or stale active
adapters, ...); `CAUGHT_BY` maps each to the clause the report must name. They derive from the
NumPy `ReferenceDriver`, so they are cheap and independent of jaxlora.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from conformance.drivers.reference import ReferenceDriver
from jaxlora import reference
from jaxlora.reference import RefAdapter


def _as(adapter: RefAdapter, cls: type[RefAdapter], **changes) -> RefAdapter:
    """`adapter` as an instance of the `RefAdapter` subclass `cls` (its own scaling rules)."""
    fields = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(RefAdapter)}
    return cls(**{**fields, **changes})


class _Rebuilt(ReferenceDriver):
    """Stores every added adapter as `adapter_class` (with `changes`)."""

    adapter_class: type[RefAdapter] = RefAdapter
    changes: tuple[tuple[str, object], ...] = ()

    def add_adapter(self, name, adapter):
        super().add_adapter(name, adapter)
        self._adapters[name] = _as(self._adapters[name], self.adapter_class, **dict(self.changes))


class ScaleIgnoredDriver(_Rebuilt):
    """Applies `A B` without the alpha / r scale."""

    changes = (("fixed_scale", 1.0),)


class RsloraIgnoredDriver(_Rebuilt):
    """Uses alpha / r even when `use_rslora` asks for alpha / sqrt(r)."""

    changes = (("use_rslora", False),)


class _EndswithKeys(RefAdapter):
    def rank_at(self, path):
        return int(next((v for k, v in self.rank_pattern.items() if path.endswith(k)), self.r))

    def scale_at(self, path):
        if self.fixed_scale is not None:
            return self.fixed_scale
        alpha = next((v for k, v in self.alpha_pattern.items() if path.endswith(k)), None)
        return reference.scale(alpha or self.lora_alpha, self.rank_at(path), self.use_rslora)


class PatternEndswithDriver(_Rebuilt):
    """Matches rank/alpha pattern keys as plain string suffixes (`1.q` hits `layers.11.q`)."""

    adapter_class = _EndswithKeys


class _LastKeyWins(RefAdapter):
    def rank_at(self, path):
        return int(reference.resolve(dict(reversed(self.rank_pattern.items())), path, self.r))

    def scale_at(self, path):
        if self.fixed_scale is not None:
            return self.fixed_scale
        alphas = dict(reversed(self.alpha_pattern.items()))
        alpha = float(reference.resolve(alphas, path, self.lora_alpha))
        return reference.scale(alpha, self.rank_at(path), self.use_rslora)


class PatternLastMatchDriver(_Rebuilt):
    """When several pattern keys match a path, takes the last one instead of the first."""

    adapter_class = _LastKeyWins


class _GlobalRankRslora(RefAdapter):
    def scale_at(self, path):
        if self.fixed_scale is not None or not self.use_rslora:
            return super().scale_at(path)
        alpha = float(reference.resolve(self.alpha_pattern, path, self.lora_alpha))
        return reference.scale(alpha, self.r, True)


class RsloraGlobalRankDriver(_Rebuilt):
    """rsLoRA scale computed with the config's `r`, not the layer's rank from `rank_pattern`."""

    adapter_class = _GlobalRankRslora


class TargetPrefixRegexDriver(ReferenceDriver):
    """A `target_modules` string only has to `re.match` (a prefix), not match the whole path."""

    def select_targets(self, paths, target_modules, exclude_modules=None):
        if isinstance(target_modules, str) and target_modules != "all-linear":
            return [p for p in paths if re.match(target_modules, p)] or super().select_targets(
                paths, target_modules, exclude_modules
            )
        return super().select_targets(paths, target_modules, exclude_modules)


class TargetSuffixNoDotDriver(ReferenceDriver):
    """A `target_modules` name targets every path that ends with it (`1.q` hits `layers.11.q`)."""

    def select_targets(self, paths, target_modules, exclude_modules=None):
        if isinstance(target_modules, list):
            found = [p for p in paths if any(p.endswith(n) for n in target_modules)]
            excluded = set(reference.targets(exclude_modules, paths)) if exclude_modules else set()
            found = [p for p in found if p not in excluded]
            if found:
                return found
        return super().select_targets(paths, target_modules, exclude_modules)


class DottedNamesRefusedDriver(ReferenceDriver):
    """Refuses adapter names with a dot (a library that uses names as module attribute keys)."""

    def add_adapter(self, name, adapter):
        if "." in name:
            raise KeyError(f'module name can\'t contain ".", got: {name}')
        super().add_adapter(name, adapter)


class LastLayerTanhDriver(ReferenceDriver):
    """Applies `tanh` after the last layer too."""

    def forward(self, x):
        return np.tanh(super().forward(x))


class LeakyActiveDriver(ReferenceDriver):
    """Keeps the previous active adapters on every layer the new active set does not target."""

    def build(self, layers, dtype):
        super().build(layers, dtype)
        self._previous: list = []

    def set_active(self, active):
        previous = [self._adapters[n] for n in self._active]
        super().set_active(active)
        self._previous = previous

    def forward(self, x):
        current = [self._adapters[n] for n in self._active]
        covered = {p for ad in current for p in ad.weights}
        leaked = [
            dataclasses.replace(
                ad, weights={p: w for p, w in ad.weights.items() if p not in covered}
            )
            for ad in self._previous
        ]
        return reference.chain_forward(self._layers, x, current + leaked, self._dtype)


class UnknownIsBaseDriver(ReferenceDriver):
    """Silently falls back to the base model when asked for an unknown adapter."""

    def set_active(self, active):
        try:
            super().set_active(active)
        except LookupError:
            self._active = ()


class SwappedRowsDriver(ReferenceDriver):
    """Returns rows 0 and 1 of a mixed batch swapped."""

    def forward_mixed(self, x, rows):
        y = super().forward_mixed(x, rows)
        if len(y) > 1:
            y = y.copy()
            y[[0, 1]] = y[[1, 0]]
        return y


class MixedNoneIsFirstDriver(ReferenceDriver):
    """Routes "no adapter" rows of a mixed batch to the first adapter added."""

    def forward_mixed(self, x, rows):
        first = next(iter(self._adapters), None)
        return super().forward_mixed(x, [first if r is None else r for r in rows])


class MutatingMergeDriver(ReferenceDriver):
    """Keeps the caller's base arrays and merges into them in place (a shared, mutated base)."""

    def build(self, layers, dtype):
        super().build(layers, dtype)
        self._layers = [(p, np.asarray(w), np.asarray(c)) for p, w, c in layers]

    def merge(self, safe=False):
        for ad in (self._adapters[n] for n in self._active):
            for path, w, _ in self._layers:
                terms = ad.terms(path)
                if terms is not None:
                    w += terms[2] * (terms[0] @ terms[1])
        self._merged = self._layers

    def unmerge(self):
        for ad in (self._adapters[n] for n in self._active):
            for path, w, _ in self._layers:
                terms = ad.terms(path)
                if terms is not None:
                    w -= terms[2] * (terms[0] @ terms[1])
        self._merged = None


class StaleDeleteDriver(ReferenceDriver):
    """Deletes the adapter's name but keeps its delta applied when it was active."""

    def build(self, layers, dtype):
        super().build(layers, dtype)
        self._ghosts: list = []

    def delete_adapter(self, name):
        adapter, was_active = self._adapters.get(name), name in self._active
        super().delete_adapter(name)
        if was_active:
            self._ghosts.append(adapter)

    def forward(self, x):
        active = [self._adapters[n] for n in self._active] + self._ghosts
        return reference.chain_forward(self._layers, x, active, self._dtype)


class SvdMinRankDriver(ReferenceDriver):
    """`svd` without a target rank keeps the smallest input rank instead of the largest."""

    def combine(self, new_name, names, weights, method, svd_rank=None):
        if method == "svd" and svd_rank is None:
            ads = [self._adapters[n] for n in names]
            svd_rank = min(a.shape[1] for ad in ads for a, _ in ad.weights.values())
        super().combine(new_name, names, weights, method, svd_rank)


#: broken driver -> the clause whose check must fail
CAUGHT_BY = {
    ScaleIgnoredDriver: "SW-SCALE-1",
    RsloraIgnoredDriver: "SW-SCALE-2",
    PatternEndswithDriver: "SW-SCALE-3",
    PatternLastMatchDriver: "SW-SCALE-3",
    RsloraGlobalRankDriver: "SW-SCALE-3",
    TargetPrefixRegexDriver: "SW-TARGET-1",
    TargetSuffixNoDotDriver: "SW-TARGET-1",
    DottedNamesRefusedDriver: "SW-BANK-4",
    LastLayerTanhDriver: "SW-MODEL-1",
    LeakyActiveDriver: "SW-HISTORY-1",
    UnknownIsBaseDriver: "SW-ACTIVE-3",
    SwappedRowsDriver: "SW-MIXED-1",
    MixedNoneIsFirstDriver: "SW-MIXED-1",
    MutatingMergeDriver: "SW-MERGE-2",
    StaleDeleteDriver: "SW-BANK-2",
    SvdMinRankDriver: "SW-COMBINE-3",
}

__all__ = ["CAUGHT_BY", *(cls.__name__ for cls in CAUGHT_BY)]
