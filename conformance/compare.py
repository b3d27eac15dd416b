"""Comparisons the checks share: with the float64 oracle (SW-TOL-1), bitwise, and error probes.

Every helper raises `ClauseFailure` naming the clause, with the numbers that failed.

Example:
    >>> import numpy as np
    >>> expect_close("SW-TOL-1", np.ones(2), np.ones(2), "float32", "y")
    >>> expect_equal("SW-HISTORY-1", np.zeros(2), np.zeros(2), "y")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from jaxlora import reference

from .registry import ClauseFailure, expect
from .strategies import Scenario

__all__ = [
    "blame",
    "build",
    "expect_close",
    "expect_equal",
    "expect_error",
    "load",
    "oracle",
    "snapshot",
    "unchanged",
]


def _as_f64(y) -> np.ndarray:
    return np.asarray(y).astype(np.float64)


def expect_close(clause_id: str, y, y_ref, dtype: str, what: str) -> None:
    """`y` (output of a `dtype` model) within tol(dtype) of the oracle's `y_ref` (SW-TOL-1)."""
    y, y_ref = _as_f64(y), _as_f64(y_ref)
    ok, err, allowed = reference.allclose(y, y_ref, dtype)
    if not ok:
        where = ""
        if y.shape == y_ref.shape and y.size:
            diff = np.abs(y - y_ref)
            diff[np.isnan(diff)] = np.inf
            where = f" at index {tuple(int(i) for i in np.unravel_index(np.argmax(diff), y.shape))}"
        raise ClauseFailure(
            clause_id,
            f"{what}: max|y - y*| = {err:.3g}{where} exceeds {allowed:.3g} "
            f"(tol {dtype}, SW-TOL-1); shapes {y.shape} vs oracle {y_ref.shape}",
        )


def expect_equal(clause_id: str, y, y_ref, what: str) -> None:
    """`y` bitwise equal to `y_ref` (same shape and values; NaNs equal)."""
    y, y_ref = np.asarray(y), np.asarray(y_ref)
    if y.shape != y_ref.shape:
        raise ClauseFailure(clause_id, f"{what}: shape {y.shape} != {y_ref.shape}")
    a, b = _as_f64(y), _as_f64(y_ref)
    if not np.array_equal(a, b, equal_nan=True):
        raise ClauseFailure(
            clause_id,
            f"{what}: not bitwise equal (max difference {np.nanmax(np.abs(a - b)):.3g}, "
            f"{int(np.sum(a != b))} of {a.size} values differ)",
        )


def expect_error(
    clause_id: str,
    driver,
    call: Callable[[], object],
    what: str,
    mentions: Iterable[str] = (),
) -> BaseException:
    """Run `call`; it must raise (an instance of `driver.error_types` if declared) and its
    message must contain every string of `mentions`. Returns the exception."""
    try:
        call()
    except Exception as e:  # any exception type signals an error (driver protocol)
        error = e
    else:
        raise ClauseFailure(clause_id, f"{what}: no error was raised")
    types = getattr(driver, "error_types", None)
    if types:
        expect(
            "SW-ERROR-1",
            isinstance(error, tuple(types)),
            f"{what}: raised {type(error).__name__}, not one of the driver's error_types "
            f"{[t.__name__ for t in types]}: {error}",
        )
    message = str(error)
    for text in mentions:
        expect(
            clause_id,
            text in message,
            f"{what}: the error message does not name {text!r}: {type(error).__name__}: "
            f"{message[:300]}",
        )
    return error


@contextlib.contextmanager
def blame(clause_id: str, what: str) -> Iterator[None]:
    """An exception the driver raises inside the block, where the spec asks for none, is a
    failure of `clause_id` (the clause of the operation), not of the check's primary clause."""
    try:
        yield
    except ClauseFailure:
        raise
    except Exception as e:  # any exception type: the driver failed where it must not
        raise ClauseFailure(clause_id, f"{what}: the driver raised {type(e).__name__}: {e}") from e


def build(driver, scenario: Scenario, layers=None) -> np.ndarray:
    """Build `scenario`'s model (or `layers`) in `driver` and check the base model's output for
    `scenario.x()` (SW-MODEL-1: a broken chain is reported as such, not as the clause a check is
    about); return that output."""
    layers = scenario.layers() if layers is None else layers
    x = scenario.x()
    with blame("SW-MODEL-1", f"build and run the base model {[p for p, _, _ in layers]}"):
        driver.build(layers, scenario.dtype)
        y = driver.forward(x)
    expect_close("SW-MODEL-1", y, oracle(layers, x, []), scenario.dtype, "base model")
    return y


def load(driver, scenario: Scenario, names: Iterable[str] | None = None) -> dict:
    """`build` `scenario`'s model in `driver` and add its adapters; return
    `name -> RefAdapter`."""
    build(driver, scenario)
    adapters = scenario.adapters_by_name()
    chosen = list(adapters) if names is None else list(names)
    for name in chosen:
        driver.add_adapter(name, adapters[name])
    return {n: adapters[n] for n in chosen}


def oracle(layers, x, active: Iterable[reference.RefAdapter]) -> np.ndarray:
    """The float64 oracle output (SW-MODEL-1, SW-FORWARD-1)."""
    return reference.chain_forward(layers, x, list(active), np.float64)


def snapshot(values) -> list[np.ndarray]:
    """Copies of every array in `values` (layers, adapters, dicts of arrays)."""
    out: list[np.ndarray] = []

    def walk(v):
        if isinstance(v, np.ndarray):
            out.append(v.copy())
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)
        elif isinstance(v, list | tuple):
            for item in v:
                walk(item)
        elif isinstance(v, reference.RefAdapter):
            walk(v.weights)

    walk(values)
    return out


def unchanged(clause_id: str, before: list[np.ndarray], values, what: str) -> None:
    """The arrays in `values` are bitwise equal to the `snapshot` taken before."""
    after = snapshot(values)
    expect(clause_id, len(after) == len(before), f"{what}: the number of arrays changed")
    for i, (a, b) in enumerate(zip(before, after, strict=True)):
        expect_equal(clause_id, b, a, f"{what} (array #{i})")
