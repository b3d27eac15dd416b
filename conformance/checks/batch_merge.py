"""Checks of mixed batches, merge/unmerge and weighted combination.

Spec sections 6-8 of `specs/switching.md`.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from jaxlora import reference

from ..compare import (
    blame,
    build,
    expect_close,
    expect_equal,
    expect_error,
    load,
    oracle,
    snapshot,
    unchanged,
)
from ..registry import clause, expect
from ..strategies import RANKS, Scenario, scenarios

_WEIGHTS = (1.0, 0.5, -1.0, 2.0, 0.0)


@st.composite
def _mixed_cases(draw, driver):
    sc = draw(scenarios(driver, n_adapters=(1, 3), batches=(2, 4)))
    rows = draw(
        st.lists(st.sampled_from([None, *sc.names()]), min_size=sc.batch, max_size=sc.batch).filter(
            lambda r: any(n is not None for n in r)
        )
    )
    return sc, rows


@clause("SW-MIXED-1", needs={"mixed"}, owns="mixed", cases=lambda d: _mixed_cases(d))
def check_mixed_rows(driver, case) -> None:
    """SW-MIXED-1: row i of a mixed batch is row i alone under its own adapter (or none)."""
    sc, rows = case
    adapters = load(driver, sc)
    x = sc.x()
    y = driver.forward_mixed(x, rows)
    want = reference.mixed_forward(
        sc.layers(), x, [None if r is None else adapters[r] for r in rows], np.float64
    )
    expect_close("SW-MIXED-1", y, want, sc.dtype, f"mixed batch with rows {rows}")


@clause("SW-MIXED-2", needs={"mixed"}, cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_mixed_errors(driver, sc: Scenario) -> None:
    """SW-MIXED-2: a wrong number of names or an unknown name raises; the active set is kept."""
    load(driver, sc)
    x = sc.x()
    driver.set_active("a0")
    y = driver.forward(x)
    rows = ["a0"] * len(x)
    too_many = lambda: driver.forward_mixed(x, [*rows, None])  # noqa: E731
    expect_error("SW-MIXED-2", driver, too_many, f"{len(x) + 1} names for {len(x)} rows")
    unknown = lambda: driver.forward_mixed(x, [*rows[:-1], "no_such_adapter"])  # noqa: E731
    error = expect_error("SW-MIXED-2", driver, unknown, "an unknown row name", ["no_such_adapter"])
    with blame("SW-MIXED-2", "a mixed batch after the refused ones"):
        driver.forward_mixed(x, [None] * len(x))
        after = driver.forward(x)
    expect_equal("SW-MIXED-2", after, y, "active set after mixed calls")
    for name in sc.names():  # last: SW-MIXED-2 is this check's clause
        expect(
            "SW-ACTIVE-3",
            name in str(error),
            f"routing a row to an unknown adapter: the error does not list the existing {name!r}: "
            f"{type(error).__name__}: {str(error)[:300]}",
        )


def _active(driver, sc: Scenario) -> list[str]:
    return sc.names() if "multi_active" in driver.capabilities else ["a0"]


def _activate(driver, names: list[str]) -> None:
    driver.set_active(names if len(names) > 1 else names[0])


@clause(
    "SW-MERGE-1", needs={"merge"}, owns="merge", cases=lambda d: scenarios(d, n_adapters=(1, 2))
)
def check_merge(driver, sc: Scenario) -> None:
    """SW-MERGE-1: merged kernels are W + sum s_i A_i B_i; merged model == active adapters."""
    adapters = load(driver, sc)
    layers, x = sc.layers(), sc.x()
    names = _active(driver, sc)
    _activate(driver, names)
    driver.merge()
    active = [adapters[n] for n in names]
    expect_close("SW-MERGE-1", driver.forward(x), oracle(layers, x, active), sc.dtype, "merged")
    kernels = driver.base_kernels()
    for path, w, _ in reference.merge(layers, active):
        expect_close("SW-MERGE-1", kernels[path], w, sc.dtype, f"merged kernel {path!r}")
    driver.unmerge()


@clause("SW-MERGE-2", needs={"merge"}, cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_merge_keeps_original(driver, sc: Scenario) -> None:
    """SW-MERGE-2: merge modifies none of the values it was given; with "exact_unmerge", going
    back is bitwise."""
    layers, adapters, x = sc.layers(), sc.adapters_by_name(), sc.x()
    given = snapshot([layers, adapters])
    build(driver, sc, layers)
    for name, adapter in adapters.items():
        driver.add_adapter(name, adapter)
    _activate(driver, _active(driver, sc))
    before, kernels = driver.forward(x), driver.base_kernels()
    obtained = snapshot(kernels)
    driver.merge()
    driver.forward(x)
    unchanged("SW-MERGE-2", given, [layers, adapters], "base and adapter arrays given")
    unchanged("SW-MERGE-2", obtained, kernels, "base kernels obtained before the merge")
    driver.unmerge()
    if "exact_unmerge" in driver.capabilities:
        after = driver.base_kernels()
        for path, w in kernels.items():
            expect_equal("SW-MERGE-2", after[path], w, f"kernel {path!r} after unmerge")
        expect_equal("SW-MERGE-2", driver.forward(x), before, "output after unmerge")


@clause("SW-MERGE-3", needs={"merge"}, cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_unmerge(driver, sc: Scenario) -> None:
    """SW-MERGE-3: unmerge returns the original kernels and outputs under SW-TOL-1."""
    adapters = load(driver, sc)
    layers, x = sc.layers(), sc.x()
    names = _active(driver, sc)
    _activate(driver, names)
    driver.merge()
    driver.unmerge()
    kernels = driver.base_kernels()
    for path, w, _ in layers:
        expect_close("SW-MERGE-3", kernels[path], w, sc.dtype, f"kernel {path!r} after unmerge")
    want = oracle(layers, x, [adapters[n] for n in names])
    expect_close("SW-MERGE-3", driver.forward(x), want, sc.dtype, "forward after unmerge")


@st.composite
def _nonfinite_cases(draw, driver):
    return draw(scenarios(driver)), draw(st.sampled_from((np.nan, np.inf, -np.inf)))


@clause("SW-MERGE-4", needs={"safe_merge"}, cases=lambda d: _nonfinite_cases(d))
def check_safe_merge(driver, case) -> None:
    """SW-MERGE-4: a safe merge of a NaN/Inf delta raises naming adapter and layer; no change."""
    sc, bad_value = case
    layers, x = sc.layers(), sc.x()
    base, kernels = build(driver, sc, layers), driver.base_kernels()
    bad = sc.adapter(0)
    path = next(iter(bad.weights))
    a, b = bad.weights[path]
    b = b.copy()
    b[0, 0] = bad_value
    bad.weights[path] = (a, b)
    driver.add_adapter("bad", bad)
    driver.set_active("bad")
    call = lambda: driver.merge(safe=True)  # noqa: E731
    expect_error("SW-MERGE-4", driver, call, f"safe merge with {b[0, 0]} in B", ["bad", path])
    after = driver.base_kernels()
    for p, w in kernels.items():
        expect_equal("SW-MERGE-4", after[p], w, f"kernel {p!r} after the refused merge")
    driver.set_active(None)
    expect_equal("SW-MERGE-4", driver.forward(x), base, "base output after the refused merge")


def _weighted(driver, ranks=RANKS):
    return st.tuples(
        scenarios(driver, n_adapters=(2, 3), ranks=ranks),
        st.lists(st.sampled_from(_WEIGHTS), min_size=3, max_size=3),
    )


def _check_combination(driver, sc, weights, method, want_adapter, clause_id, svd_rank=None):
    adapters = load(driver, sc)
    names = sc.names()
    weights = weights[: len(names)]
    driver.combine("mix", names, weights, method, svd_rank)
    driver.set_active("mix")
    x = sc.x()
    want = oracle(sc.layers(), x, [want_adapter([adapters[n] for n in names], weights)])
    expect_close(clause_id, driver.forward(x), want, sc.dtype, f"{method} of {names} x {weights}")


@clause("SW-COMBINE-1", needs={"combine_cat"}, owns="combine_cat", cases=_weighted)
def check_combine_cat(driver, case) -> None:
    """SW-COMBINE-1: `cat` is exact: A B = sum_i w_i s_i A_i B_i."""
    sc, weights = case
    _check_combination(driver, sc, weights, "cat", reference.combine_cat, "SW-COMBINE-1")


def _equal_rank_cases(driver):
    return st.sampled_from(RANKS).flatmap(lambda r: _weighted(driver, ranks=(r,)))


@clause("SW-COMBINE-2", needs={"combine_linear"}, cases=_equal_rank_cases)
def check_combine_linear(driver, case) -> None:
    """SW-COMBINE-2: `linear` per PEFT's definition; unequal ranks at a layer are an error."""
    sc, weights = case
    _check_combination(driver, sc, weights, "linear", reference.combine_linear, "SW-COMBINE-2")
    a0 = sc.adapter(0)
    path, (a, b) = next(iter(a0.weights.items()))
    padded = (np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0))))
    wider = type(a0)(a.shape[1] + 1, a0.lora_alpha, {path: padded})  # rank + 1 at `path`
    driver.add_adapter("wider", wider)
    call = lambda: driver.combine("bad", ["a0", "wider"], [1.0, 1.0], "linear")  # noqa: E731
    expect_error("SW-COMBINE-2", driver, call, "linear with unequal ranks")


@clause(
    "SW-COMBINE-3",
    needs={"combine_svd"},
    cases=lambda d: st.tuples(_weighted(d), st.sampled_from((None, 1, 2))),
)
def check_combine_svd(driver, case) -> None:
    """SW-COMBINE-3: `svd` gives a best rank-k approximation of the exact weighted sum."""
    (sc, weights), k = case
    adapters = sc.adapters_by_name()
    exact = reference.combine_cat(list(adapters.values()), weights[: len(adapters)])
    for path, (a, b) in exact.weights.items():  # a unique best rank-k needs a singular-value gap
        s = np.linalg.svd(a @ b, compute_uv=False)
        kk = (
            k
            if k is not None
            else max(ad.rank_at(path) for ad in adapters.values() if path in ad.weights)
        )
        assume(kk >= len(s) or s[kk - 1] - s[kk] > 1e-2 * (1 + s[0]))
    make = lambda ads, ws: reference.combine_svd(ads, ws, k)  # noqa: E731
    _check_combination(driver, sc, weights, "svd", make, "SW-COMBINE-3", svd_rank=k)


@clause(
    "SW-COMBINE-4",
    needs={"combine_cat", "multi_active"},
    cases=lambda d: scenarios(d, n_adapters=(2, 3)),
)
def check_several_equals_cat(driver, sc: Scenario) -> None:
    """SW-COMBINE-4: activating [n1, n2] equals activating cat(n1, n2) with weights [1, 1]."""
    adapters = load(driver, sc)
    x, pair = sc.x(), sc.names()[:2]
    driver.set_active(pair)
    y_several = driver.forward(x)
    want = oracle(sc.layers(), x, [adapters[n] for n in pair])
    expect_close("SW-FORWARD-1", y_several, want, sc.dtype, f"{pair} active")
    driver.combine("both", pair, [1.0, 1.0], "cat")
    driver.set_active("both")
    y_cat = driver.forward(x)
    cat = reference.combine_cat([adapters[n] for n in pair], [1.0, 1.0])
    expect_close("SW-COMBINE-1", y_cat, oracle(sc.layers(), x, [cat]), sc.dtype, f"cat{pair}")
    expect_close("SW-COMBINE-4", y_cat, y_several, sc.dtype, f"cat{pair} vs active {pair}")
    expect_close("SW-COMBINE-4", y_cat, want, sc.dtype, f"cat{pair} vs the oracle")
