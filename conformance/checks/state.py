"""Checks of the driver's state: active set, history independence, bank, errors.

Spec sections 4, 5 and SW-ERROR-1 of `specs/switching.md`. Bitwise clauses (SW-ACTIVE-2,
SW-HISTORY-1) compare outputs exactly; the rest compare with the oracle under SW-TOL-1.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from jaxlora import reference

from ..compare import (
    build,
    expect_close,
    expect_equal,
    expect_error,
    load,
    oracle,
    snapshot,
    unchanged,
)
from ..registry import clause
from ..strategies import SIMPLE_PRESETS, AdapterSpec, Scenario, on, precise_dtype, scenarios
from ..world import adapter_names, few_shapes

_MISSING = "no_such_adapter"


@clause("SW-ACTIVE-2", cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_none_is_base(driver, sc: Scenario) -> None:
    """SW-ACTIVE-2: with no active adapter the output is bitwise the adapter-free model's."""
    layers, x = sc.layers(), sc.x()
    base = build(driver, sc, layers)
    for name, adapter in sc.adapters_by_name().items():
        driver.add_adapter(name, adapter)
    expect_equal("SW-ACTIVE-2", driver.forward(x), base, "adapters added, none active")
    driver.set_active("a0")
    driver.forward(x)
    driver.set_active(None)
    expect_equal("SW-ACTIVE-2", driver.forward(x), base, "set_active(None) after 'a0'")
    if "multi_active" in driver.capabilities:
        driver.set_active([])
        expect_equal("SW-ACTIVE-2", driver.forward(x), base, "set_active([])")


@clause("SW-ACTIVE-1", needs={"multi_active"}, cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_active_forms(driver, sc: Scenario) -> None:
    """SW-ACTIVE-1: a name equals the one-element list; a name listed twice is an error."""
    load(driver, sc)
    x = sc.x()
    driver.set_active("a0")
    y_name = driver.forward(x)
    driver.set_active(["a0"])
    y_list = driver.forward(x)
    expect_equal("SW-ACTIVE-1", y_list, y_name, "set_active(['a0']) vs set_active('a0')")
    expect_error(
        "SW-ACTIVE-1", driver, lambda: driver.set_active(["a0", "a0"]), "an active set ['a0', 'a0']"
    )
    expect_equal("SW-ACTIVE-1", driver.forward(x), y_name, "after the refused ['a0', 'a0']")


@clause("SW-ACTIVE-3", cases=lambda d: scenarios(d, n_adapters=(1, 3)))
def check_unknown_name(driver, sc: Scenario) -> None:
    """SW-ACTIVE-3: activating an unknown name raises, names it and the existing ones, and
    changes nothing."""
    adapters = load(driver, sc)
    names = sc.names()
    x = sc.x()
    driver.set_active(names[-1])
    y = driver.forward(x)
    mention = [_MISSING, *names]
    expect_error("SW-ACTIVE-3", driver, lambda: driver.set_active(_MISSING), "set_active", mention)
    expect_equal("SW-ACTIVE-3", driver.forward(x), y, "output after the refused set_active")
    if "multi_active" in driver.capabilities:
        call = lambda: driver.set_active([names[0], _MISSING])  # noqa: E731
        expect_error("SW-ACTIVE-3", driver, call, "set_active([known, unknown])", mention)
        expect_equal("SW-ACTIVE-3", driver.forward(x), y, "after the refused list")
    layers = sc.layers()
    for name in names:
        driver.set_active(name)
        want = oracle(layers, x, [adapters[name]])
        expect_close("SW-ACTIVE-3", driver.forward(x), want, sc.dtype, f"{name!r} afterwards")


_STEPS = ("activate", "forward", "none", "several", "mixed", "merge")


@st.composite
def _history_cases(draw, driver):
    sc = draw(scenarios(driver, n_adapters=(2, 3)))
    several = "multi_active" in driver.capabilities and draw(st.booleans())
    steps = draw(
        st.lists(st.tuples(st.sampled_from(_STEPS), st.integers(0, 2)), min_size=1, max_size=5)
    )
    return sc, several, steps


def _run_step(driver, sc: Scenario, step: str, k: int) -> None:
    caps, names = driver.capabilities, sc.names()
    name = names[k % len(names)]
    if step == "activate":
        driver.set_active(name)
    elif step == "none":
        driver.set_active(None)
    elif step == "several" and "multi_active" in caps:
        driver.set_active([name, names[(k + 1) % len(names)]])
    elif step == "mixed" and "mixed" in caps:
        driver.forward_mixed(sc.x(3, salt=k + 1), [name, None, names[0]])
    elif step == "merge" and "merge" in caps:
        driver.set_active(name)
        driver.merge()
        driver.forward(sc.x(salt=k + 1))
        driver.unmerge()
    driver.forward(sc.x(salt=k + 1))


@clause("SW-HISTORY-1", cases=lambda d: _history_cases(d))
def check_history_independence(driver, case) -> None:
    """SW-HISTORY-1: for one active set and input, the output is bitwise the same whatever was
    activated, forwarded, merged and unmerged before (the last step activates the others)."""
    sc, several, steps = case
    load(driver, sc)
    target = sc.names()[1:] if several else sc.names()[-1]
    x = sc.x()
    driver.set_active(target)
    first = driver.forward(x)
    for step, k in steps:
        _run_step(driver, sc, step, k)
    driver.set_active("a0")  # not in the target set
    driver.forward(x)
    driver.set_active(target)
    expect_equal("SW-HISTORY-1", driver.forward(x), first, f"active {target!r} after {steps}")


@clause("SW-BANK-1", cases=lambda d: scenarios(d, n_adapters=(2, 2)))
def check_add(driver, sc: Scenario) -> None:
    """SW-BANK-1: adding does not activate; a duplicate name raises and changes nothing."""
    layers, x = sc.layers(), sc.x()
    base = build(driver, sc, layers)
    adapters = sc.adapters_by_name()
    driver.add_adapter("a0", adapters["a0"])
    expect_equal("SW-BANK-1", driver.forward(x), base, "output after add (not activated)")
    driver.set_active("a0")
    y = driver.forward(x)
    expect_close("SW-BANK-1", y, oracle(layers, x, [adapters["a0"]]), sc.dtype, "'a0' active")
    call = lambda: driver.add_adapter("a0", adapters["a1"])  # noqa: E731
    expect_error("SW-BANK-1", driver, call, "add_adapter with an existing name", ["a0"])
    expect_equal("SW-BANK-1", driver.forward(x), y, "output after the refused add")
    driver.set_active(None)
    driver.set_active("a0")
    expect_equal("SW-BANK-1", driver.forward(x), y, "'a0' re-activated after the refused add")


@st.composite
def _named_cases(draw, driver):
    n = draw(st.integers(2, 3))
    simple = st.sampled_from(SIMPLE_PRESETS)
    sc = draw(scenarios(driver, n_adapters=(n, n), patterns=False, layout=simple, batches=(4,)))
    names = draw(adapter_names(n, few_shapes(driver))) if on(driver, "names") else tuple(sc.names())
    return sc, names


def _name_examples(driver) -> list:
    if not on(driver, "names"):
        return []
    sc = Scenario(
        SIMPLE_PRESETS[0], (AdapterSpec(1, 1.0, (0, 1)),) * 3, 4, precise_dtype(driver), 0
    )
    return [(sc, ("my.adapter", "a b", "0")), (sc, ("default", "__base__", "pop"))]


@clause("SW-BANK-4", owns="names", cases=lambda d: _named_cases(d), examples=_name_examples)
def check_adapter_names(driver, case) -> None:
    """SW-BANK-4: any non-empty name makes the adapter available, not only identifiers: names
    with dots, spaces, digits first, non-ASCII letters, or words a library might reserve
    (`default`, `__base__`, `pop`) work in add, activate, mixed rows, duplicate refusal and
    delete; the empty name is refused and changes nothing."""
    sc, names = case
    layers, x = sc.layers(), sc.x()
    build(driver, sc, layers)
    adapters = dict(zip(names, sc.adapters_by_name().values(), strict=True))
    call = lambda: driver.add_adapter("", adapters[names[0]])  # noqa: E731
    expect_error("SW-BANK-4", driver, call, "adding an adapter under the empty name", [])
    for name, adapter in adapters.items():
        driver.add_adapter(name, adapter)
    expect_close("SW-BANK-4", driver.forward(x), oracle(layers, x, []), sc.dtype, "none active")
    for name in names:
        driver.set_active(name)
        want = oracle(layers, x, [adapters[name]])
        expect_close("SW-BANK-4", driver.forward(x), want, sc.dtype, f"adapter {name!r} active")
    if "multi_active" in driver.capabilities:
        driver.set_active(list(names))
        want = oracle(layers, x, list(adapters.values()))
        expect_close("SW-BANK-4", driver.forward(x), want, sc.dtype, f"{list(names)} active")
    if "mixed" in driver.capabilities:
        rows = [names[i % len(names)] if i % 3 != 2 else None for i in range(len(x))]
        want = reference.mixed_forward(
            layers, x, [None if r is None else adapters[r] for r in rows], np.float64
        )
        got = driver.forward_mixed(x, rows)
        expect_close("SW-BANK-4", got, want, sc.dtype, f"mixed rows {rows}")
    call = lambda: driver.add_adapter(names[0], adapters[names[1]])  # noqa: E731
    expect_error("SW-BANK-1", driver, call, f"adding {names[0]!r} twice", [names[0]])
    call = lambda: driver.set_active(_MISSING)  # noqa: E731
    expect_error("SW-ACTIVE-3", driver, call, "activating an unknown name", [_MISSING, *names])
    driver.delete_adapter(names[0])
    call = lambda: driver.set_active(names[0])  # noqa: E731
    expect_error("SW-BANK-2", driver, call, f"activating the deleted {names[0]!r}", [names[0]])
    driver.set_active(names[1])
    want = oracle(layers, x, [adapters[names[1]]])
    expect_close("SW-BANK-4", driver.forward(x), want, sc.dtype, f"{names[1]!r} after a delete")


@clause("SW-BANK-2", cases=lambda d: scenarios(d, n_adapters=(2, 3)))
def check_delete(driver, sc: Scenario) -> None:
    """SW-BANK-2: deleting removes the adapter and takes it out of the active set; deleting an
    unknown name raises and changes nothing."""
    adapters = load(driver, sc)
    names, layers, x = sc.names(), sc.layers(), sc.x()
    several = "multi_active" in driver.capabilities
    active = names if several else ["a0"]
    driver.set_active(active if several else "a0")
    driver.forward(x)
    driver.delete_adapter("a0")
    rest = [n for n in active if n != "a0"]
    y = driver.forward(x)
    want = oracle(layers, x, [adapters[n] for n in rest])
    expect_close("SW-BANK-2", y, want, sc.dtype, f"after deleting active 'a0' (active {active})")
    expect_error("SW-BANK-2", driver, lambda: driver.delete_adapter("a0"), "delete twice", ["a0"])
    expect_equal("SW-BANK-2", driver.forward(x), y, "output after the refused delete")
    expect_error("SW-BANK-2", driver, lambda: driver.set_active("a0"), "activate deleted", ["a0"])
    if "mixed" in driver.capabilities:
        call = lambda: driver.forward_mixed(x, ["a0"] * len(x))  # noqa: E731
        expect_error("SW-BANK-2", driver, call, "route rows to a deleted adapter", ["a0"])
    for name in names[1:]:
        driver.set_active(name)
        want = oracle(layers, x, [adapters[name]])
        expect_close("SW-BANK-2", driver.forward(x), want, sc.dtype, f"{name!r} after the delete")


@clause("SW-BANK-3", cases=lambda d: scenarios(d, n_adapters=(2, 2)))
def check_values_are_not_mutated(driver, sc: Scenario) -> None:
    """SW-BANK-3: no operation changes a value given to the driver or obtained from it before."""
    layers, adapters, x = sc.layers(), sc.adapters_by_name(), sc.x()
    given = snapshot([layers, adapters, x])
    build(driver, sc, layers)
    for name, adapter in adapters.items():
        driver.add_adapter(name, adapter)
    driver.set_active("a0")
    caps = driver.capabilities
    y = driver.forward(x)
    kernels = driver.base_kernels() if "merge" in caps else {}
    obtained = snapshot([y, kernels])
    driver.set_active("a1")
    driver.forward(x)
    if "mixed" in caps:
        driver.forward_mixed(x, ["a1"] * len(x))
    if "merge" in caps:
        driver.merge()
        driver.forward(x)
        driver.unmerge()
    if "combine_cat" in caps:
        driver.combine("cat", ["a0", "a1"], [1.0, -0.5], "cat")
    driver.delete_adapter("a0")
    unchanged("SW-BANK-3", given, [layers, adapters, x], "arrays given to the driver")
    unchanged("SW-BANK-3", obtained, [y, kernels], "arrays the driver returned earlier")


@clause("SW-ERROR-1", cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_errors_change_nothing(driver, sc: Scenario) -> None:
    """SW-ERROR-1: bad input raises an error naming what was wrong; nothing changes."""
    adapters = load(driver, sc)
    layers, x = sc.layers(), sc.x()
    driver.set_active("a0")
    y = driver.forward(x)
    a0 = adapters["a0"]
    path, (a, b) = next(iter(a0.weights.items()))
    bad_path = type(a0)(a0.r, a0.lora_alpha, {"blocks.9.q": (a, b)})
    bad_shape = type(a0)(a0.r, a0.lora_alpha, {path: (a[:-1], b)})
    given = snapshot([adapters, bad_path, bad_shape, x])
    probes = [
        ("activate an unknown name", lambda: driver.set_active(_MISSING), [_MISSING]),
        (
            "delete an unknown name",
            lambda: driver.delete_adapter(_MISSING),
            [_MISSING, *adapters],
        ),
        ("add an existing name", lambda: driver.add_adapter("a0", a0), ["a0"]),
        (
            "add an adapter for a missing layer",
            lambda: driver.add_adapter("z", bad_path),
            ["blocks.9.q", *(p for p, _, _ in layers)],
        ),
        ("add A with the wrong input size", lambda: driver.add_adapter("z", bad_shape), [path]),
    ]
    if "mixed" in driver.capabilities:
        probes.append(("mixed batch with too few names", lambda: driver.forward_mixed(x, []), []))
    for what, call, mentions in probes:
        expect_error("SW-ERROR-1", driver, call, what, mentions)
        expect_equal("SW-ERROR-1", driver.forward(x), y, f"output after: {what}")
    unchanged("SW-ERROR-1", given, [adapters, bad_path, bad_shape, x], "arrays given")
    expect_error("SW-ERROR-1", driver, lambda: driver.set_active("z"), "activate a refused add")
    driver.set_active(None)
    expect_close("SW-ERROR-1", driver.forward(x), oracle(layers, x, []), sc.dtype, "base after")


@st.composite
def _misfit_cases(draw, driver):
    return draw(scenarios(driver)), draw(
        st.sampled_from(("missing layer", "a suffix of a layer's path", "wrong in", "wrong out"))
    )


@clause("SW-TARGET-2", cases=lambda d: _misfit_cases(d))
def check_adapter_must_fit(driver, case) -> None:
    """SW-TARGET-2: an adapter for a missing layer (also the last segment of an existing path)
    or with misfit A/B is rejected (at add, or at the latest at forward), naming the path and,
    for a missing one, the layers that exist; never silently skipped."""
    sc, kind = case
    load(driver, sc, names=[])
    good = sc.adapter(0)
    path, (a, b) = next(iter(good.weights.items()))
    existing = [p for p, _, _ in sc.layers()]
    mentions = [path]
    if kind == "missing layer":
        path, weights = "blocks.9.q", (a, b)
    elif kind == "a suffix of a layer's path":
        path, weights = path.split(".")[-1], (a, b)
        if path in existing:
            return
    elif kind == "wrong in":
        weights = (np.vstack([a, a[:1]]), b)
    else:
        weights = (a, np.hstack([b, b[:, :1]]))
    bad = dataclasses.replace(good, weights={path: weights})

    def use() -> None:
        driver.add_adapter("misfit", bad)
        driver.set_active("misfit")
        driver.forward(sc.x())

    if path not in existing:  # the error also lists the layers that exist
        mentions = [path, *existing]
    expect_error("SW-TARGET-2", driver, use, f"an adapter with {kind} at {path!r}", mentions)


_BAD_CONFIGS = (
    ("lora_alpha", {"lora_alpha": float("nan")}),
    ("lora_alpha", {"lora_alpha": float("inf")}),
    ("alpha_pattern", {"alpha_pattern": {"q": float("-inf")}}),
    ("r", {"r": 0}),
    ("r", {"r": -2}),
    ("rank_pattern", {"rank_pattern": {"q": 0}}),
    ("rank_pattern", {"rank_pattern": {"q[": 1}}),
    ("alpha_pattern", {"alpha_pattern": {"(": 1.0}}),
)


@clause(
    "SW-CONFIG-1",
    cases=lambda d: st.tuples(scenarios(d, patterns=False), st.sampled_from(_BAD_CONFIGS)),
)
def check_invalid_config(driver, case) -> None:
    """SW-CONFIG-1: a rank <= 0, a non-finite alpha (also in `rank_pattern` / `alpha_pattern`)
    or an invalid pattern regex is refused, naming the field."""
    sc, (field, change) = case
    if "pattern" in field and "patterns" not in driver.capabilities:
        return
    load(driver, sc, names=[])
    bad = dataclasses.replace(sc.adapter(0), **change)
    call = lambda: driver.add_adapter("bad", bad)  # noqa: E731
    expect_error("SW-CONFIG-1", driver, call, f"an adapter with {change}", [field])
    expect_error("SW-CONFIG-1", driver, lambda: driver.set_active("bad"), "activate a refused add")
