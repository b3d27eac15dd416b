"""The Driver protocol: the one file a LoRA implementation writes to be checked by this suite.

A driver wraps an implementation behind a small *stateful* interface (PEFT-like: an active set
that the suite changes), because that is the common denominator of LoRA libraries; functional
libraries (jaxlora) keep the state in the driver. All arrays cross the boundary as NumPy in the
spec's orientation (SW-NOTATION-1): kernels `[in, out]`, `A [in, r]`, `B [r, out]`.

Adapters are given as `jaxlora.reference.RefAdapter` (config + factors), the same value the
oracle consumes, so the suite compares like with like.

Example (the reference driver):
    >>> from conformance.drivers.reference import ReferenceDriver
    >>> d = ReferenceDriver()
    >>> "mixed" in d.capabilities
    True
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from jaxlora.reference import RefAdapter

__all__ = ["CAPABILITIES", "OPTIONAL_MEMBERS", "Driver", "Layers"]

#: `(path, kernel [in, out], bias [out])` per layer, in order (SW-MODEL-1).
Layers = list[tuple[str, np.ndarray, np.ndarray]]

#: Optional capabilities a driver may declare; clauses needing one it lacks are "not supported".
CAPABILITIES = frozenset(
    {
        "multi_active",  # set_active with a list of names (SW-ACTIVE-1, SW-FORWARD-1)
        "mixed",  # forward_mixed (SW-MIXED-*)
        "merge",  # merge / unmerge (SW-MERGE-*)
        "safe_merge",  # merge(safe=True) (SW-MERGE-4)
        "combine_cat",  # combine(method="cat") (SW-COMBINE-1, SW-COMBINE-4)
        "combine_linear",
        "combine_svd",
        "rslora",  # use_rslora (SW-SCALE-2)
        "patterns",  # rank_pattern / alpha_pattern (SW-SCALE-3)
        "dtype:float64",
        "dtype:float32",
        "dtype:bfloat16",
        "dtype:float16",
        "exact_unmerge",  # unmerge restores the base bitwise (SW-MERGE-2, SW-HISTORY-1)
        "target_selection",  # select_targets (SW-TARGET-1)
        "compile_count",  # compile_count (SW-CONFORM-3)
    }
)

#: Optional members a driver MAY define (absent: the clauses that need them are "not supported"):
#:
#: - `versions() -> dict[str, str]`: implementation versions, copied into the JSON report.
#: - `select_targets(paths, target_modules, exclude_modules) -> list[str]` ("target_selection"):
#:   the paths the implementation would target; must raise when none matches (SW-TARGET-1).
#: - `compile_count() -> int` ("compile_count"): how many times the forward has been compiled so
#:   far (jaxlora: the jit cache size), to check SW-CONFORM-3.
#: - `error_types: tuple[type[BaseException], ...]`: when set, every error the suite provokes must
#:   be an instance of one of them (jaxlora: `JaxLoraError`, SW-ERROR-1).
#: - `few_shapes: bool`: True asks for a few fixed layouts and name sets only (a driver that
#:   compiles per shape); default: whether it declares "compile_count" (SW-SUITE-9).
OPTIONAL_MEMBERS = ("versions", "select_targets", "compile_count", "error_types", "few_shapes")


@runtime_checkable
class Driver(Protocol):
    """What the suite calls. Any exception signals an error (the suite checks that errors are
    raised where the spec requires them, and that the driver's observable state is unchanged
    afterwards).

    Every driver has `name`, `capabilities`, `build`, `add_adapter`, `delete_adapter`,
    `set_active` and `forward`; the other methods are needed only with the capability named in
    their docstring (`conformance.loader.driver_problems` lists what a driver lacks)."""

    #: short name for reports
    name: str
    #: subset of CAPABILITIES
    capabilities: frozenset[str]

    def build(self, layers: Layers, dtype: str) -> None:
        """(Re)create the base model from NumPy weights in `dtype` (e.g. "float32"); drop all
        adapters; no active adapter."""

    def add_adapter(self, name: str, adapter: RefAdapter) -> None:
        """Add an adapter (not activated, SW-BANK-1); adapter weights are cast to the model
        dtype. Must raise if `name` exists."""

    def delete_adapter(self, name: str) -> None:
        """Delete an adapter (SW-BANK-2). Must raise if unknown."""

    def set_active(self, active: str | list[str] | None) -> None:
        """Set the active set: a name, an ordered list, or None (base). Must raise on unknown
        names and leave the previous active set in place."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The model output for `x [batch, in]` under the current state."""

    def forward_mixed(self, x: np.ndarray, rows: list[str | None]) -> np.ndarray:
        """Row i under adapter rows[i] (None: no adapter). Needs "mixed"."""

    def merge(self, safe: bool = False) -> None:
        """Merge the active adapters into the base weights. Needs "merge". While merged, `forward`
        gives the merged model's output (no delta applied twice); the suite calls only
        `forward`, `base_kernels` and `unmerge` until `unmerge`."""

    def unmerge(self) -> None:
        """Undo `merge`. Needs "merge"."""

    def combine(
        self,
        new_name: str,
        names: list[str],
        weights: list[float],
        method: str,
        svd_rank: int | None = None,
    ) -> None:
        """Add `new_name`, a weighted combination (SW-COMBINE-*). Needs "combine_<method>"."""

    def base_kernels(self) -> dict[str, np.ndarray]:
        """The current base kernels (`[in, out]`, as NumPy copies), to check merges and their
        undo. Needs "merge"."""
