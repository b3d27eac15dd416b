"""Deliberately broken drivers: each must be caught by the conformance suite, with its clause.

Used by `tests/test_conformance_broken.py`. Each class breaks one rule of `specs/switching.md`
the way real implementations have (see PEFT-NOTES.md's pain points); `CAUGHT_BY` maps each
to the clause the report must name.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from conformance.drivers.jaxlora_driver import JaxLoraDriver
from conformance.drivers.reference import ReferenceDriver
from jaxlora import reference


class ScaleIgnoredDriver(JaxLoraDriver):
    """Applies `A B` without the alpha / r scale."""

    def _to_adapter(self, name, adapter):
        weights = super()._to_adapter(name, adapter)
        return {
            p: dataclasses.replace(w, scale=jnp.ones((), jnp.float32)) for p, w in weights.items()
        }


class RsloraIgnoredDriver(JaxLoraDriver):
    """Uses alpha / r even when `use_rslora` asks for alpha / sqrt(r)."""

    def _to_adapter(self, name, adapter):
        return super()._to_adapter(name, dataclasses.replace(adapter, use_rslora=False))


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


class SwappedRowsDriver(JaxLoraDriver):
    """Returns rows 0 and 1 of a mixed batch swapped."""

    def forward_mixed(self, x, rows):
        y = super().forward_mixed(x, rows)
        if len(y) > 1:
            y = y.copy()
            y[[0, 1]] = y[[1, 0]]
        return y


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


#: broken driver -> the clause whose check must fail
CAUGHT_BY = {
    ScaleIgnoredDriver: "SW-SCALE-1",
    RsloraIgnoredDriver: "SW-SCALE-2",
    LeakyActiveDriver: "SW-HISTORY-1",
    UnknownIsBaseDriver: "SW-ACTIVE-3",
    SwappedRowsDriver: "SW-MIXED-1",
    MutatingMergeDriver: "SW-MERGE-2",
    StaleDeleteDriver: "SW-BANK-2",
}

__all__ = ["CAUGHT_BY", *(cls.__name__ for cls in CAUGHT_BY)]
