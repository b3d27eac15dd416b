"""Checks of what a forward computes: scaling, targets, forward, dtypes, tolerance, padding.

Spec sections 1-3 and SW-CONFORM-1..3 of `specs/switching.md`. Each check builds a model from
a drawn `Scenario`, runs the driver and compares with the float64 oracle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import strategies as st

from jaxlora import reference

from ..compare import build, expect_close, expect_equal, expect_error, load, oracle
from ..registry import clause, expect
from ..strategies import (
    SIMPLE_PRESETS,
    AdapterSpec,
    Scenario,
    on,
    precise_dtype,
    round_to,
    scenarios,
    supported_dtypes,
)
from ..world import LAYOUT_PRESETS, free_layouts, target_names, target_regexes

_SIMPLE = st.sampled_from(SIMPLE_PRESETS)


def _single(driver, sc: Scenario, clause_id: str, what: str) -> None:
    """Activate `a0` and compare one forward with the oracle."""
    adapters = load(driver, sc)
    driver.set_active("a0")
    x = sc.x()
    expect_close(
        clause_id, driver.forward(x), oracle(sc.layers(), x, [adapters["a0"]]), sc.dtype, what
    )


@clause(
    "SW-SCALE-1",
    owns="scaled",
    cases=lambda d: scenarios(d, rslora=False, patterns=False, layout=_SIMPLE),
)
def check_default_scale(driver, sc: Scenario) -> None:
    """SW-SCALE-1: without rsLoRA the delta is scaled by alpha / r."""
    _single(driver, sc, "SW-SCALE-1", "forward with alpha/r scaling")


@clause(
    "SW-SCALE-2",
    needs={"rslora"},
    owns="rslora",
    cases=lambda d: scenarios(d, rslora=True, patterns=False, ranks=(2, 4), layout=_SIMPLE),
)
def check_rslora_scale(driver, sc: Scenario) -> None:
    """SW-SCALE-2: with rsLoRA the delta is scaled by alpha / sqrt(r)."""
    _single(driver, sc, "SW-SCALE-2", "forward with rsLoRA alpha/sqrt(r) scaling")


def _pattern_examples(driver) -> list[Scenario]:
    """Known hard cases of SW-SCALE-3: a key that only ends the path as a string (`1.q` vs
    `layers.11.q`), two keys matching one path in both orders, an unescaped dot, a regex key."""
    if not all(on(driver, f) for f in ("patterns", "layouts", "scaled")):
        return []  # examples use only features that are on (attribution re-runs)
    layout = LAYOUT_PRESETS[1]  # layers.1.q, layers.11.q, layers.1.xq, head
    dtype = precise_dtype(driver)

    def case(rank_pattern, alpha_pattern=(), rslora=False):
        spec = AdapterSpec(2, 8.0, (0, 1, 2, 3), rslora, rank_pattern, alpha_pattern)
        return Scenario(layout, (spec,), batch=1, dtype=dtype, seed=1)

    return [
        case((("1.q", 4),), (("q", 3.0),)),
        case((("q", 1), ("11.q", 4)), (("layers.11.q", 16.0), ("q", 2.0))),
        case((("11.q", 4), ("q", 1)), (("q", 2.0), ("layers.11.q", 16.0))),
        case((("1.xq", 1),), (("xq|head", 1.0), (r"layers\.1\.q", 3.0))),
    ] + ([case((("head", 4),), rslora=True)] if on(driver, "rslora") else [])  # r in sqrt(r)


@clause(
    "SW-SCALE-3",
    needs={"patterns"},
    owns="patterns",
    cases=lambda d: scenarios(d, patterns=True),
    examples=_pattern_examples,
)
def check_rank_alpha_patterns(driver, sc: Scenario) -> None:
    """SW-SCALE-3: rank_pattern / alpha_pattern (first matching key) set r and alpha per layer."""
    _single(driver, sc, "SW-SCALE-3", "forward with rank/alpha patterns")


@st.composite
def _target_cases(draw, driver):
    layout = draw(st.one_of(st.sampled_from(LAYOUT_PRESETS), free_layouts()))
    paths = list(layout.paths if on(driver, "layouts") else SIMPLE_PRESETS[1].paths)
    names = target_names(paths)
    rules = st.one_of(
        st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True),
        st.sampled_from(target_regexes(paths)),
    )
    exclude = st.one_of(
        st.none(),
        st.lists(st.sampled_from(names), min_size=1, max_size=1),
        st.sampled_from(target_regexes(paths)[1:-1]),
    )
    return paths, draw(rules), draw(exclude)


def _target_examples(driver) -> list:
    if not on(driver, "layouts"):
        return []
    paths = ["layers.1.q", "layers.11.q", "layers.1.xq", "model.layers.1.q"]
    return [
        (paths, ["1.q"], None),  # ends "layers.11.q" as a string, not after a dot
        (paths, r"layers\.1", None),  # re.match-es a prefix, fullmatch-es nothing: an error
        (paths, ["layers.1.q"], ["q"]),  # the exclusion removes every target: an error
        (paths, ["q", "xq"], r"model\..*"),
        (paths, "ALL-LINEAR", None),  # a regex, not the "all-linear" shorthand
    ]


@clause(
    "SW-TARGET-1",
    needs={"target_selection"},
    cases=lambda d: _target_cases(d),
    examples=_target_examples,
)
def check_target_selection(driver, case) -> None:
    """SW-TARGET-1: list/regex/"all-linear" target rules and exclusions; no match is an error."""
    paths, rule, exclude = case
    want = reference.targets(rule, paths, exclude)
    what = f"target_modules={rule!r}, exclude_modules={exclude!r} over {paths}"
    if not want:
        call = lambda: driver.select_targets(paths, rule, exclude)  # noqa: E731
        expect_error("SW-TARGET-1", driver, call, f"{what} (matching no layer)")
        return
    got = list(driver.select_targets(paths, rule, exclude))
    expect("SW-TARGET-1", sorted(got) == sorted(want), f"{what}: targets {got}, spec says {want}")


@clause(
    "SW-MODEL-1",
    owns="layouts",
    cases=lambda d: scenarios(d, patterns=False),
)
def check_model_paths(driver, sc: Scenario) -> None:
    """SW-MODEL-1: models of 1 to 8 layers whose dotted paths nest and collide (suffixes,
    numbers that prefix others); an adapter on some of them changes exactly those."""
    _single(driver, sc, "SW-MODEL-1", f"forward of a model with paths {sc.layout.paths}")


@clause(
    "SW-FORWARD-1",
    "SW-NOTATION-1",
    cases=lambda d: scenarios(d),
)
def check_forward_single(driver, sc: Scenario) -> None:
    """SW-FORWARD-1, SW-NOTATION-1: one active adapter on non-square layers."""
    _single(driver, sc, "SW-FORWARD-1", "forward with one active adapter")


@clause(
    "SW-FORWARD-1",
    "SW-ACTIVE-1",
    needs={"multi_active"},
    owns="multi_active",
    cases=lambda d: scenarios(d, n_adapters=(2, 3)),
)
def check_forward_several(driver, sc: Scenario) -> None:
    """SW-FORWARD-1, SW-ACTIVE-1: several active adapters: deltas summed in list order."""
    adapters = load(driver, sc)
    names = sc.names()[::-1]
    driver.set_active(names)
    x = sc.x()
    want = oracle(sc.layers(), x, [adapters[n] for n in names])
    expect_close("SW-FORWARD-1", driver.forward(x), want, sc.dtype, f"forward with {names} active")


@clause("SW-FORWARD-2", cases=lambda d: scenarios(d, n_adapters=(1, 2)))
def check_untargeted_layers(driver, sc: Scenario) -> None:
    """SW-FORWARD-2: each adapter here targets one layer only; the others are the base layers."""
    layers = sc.layers()
    build(driver, sc, layers)
    x = sc.x()
    for i, name in enumerate(sc.names()):
        spec = sc.adapters[i]
        ref = dataclasses.replace(spec, targets=spec.targets[-1:]).build(
            layers, sc.seed + i, sc.dtype
        )
        driver.add_adapter(name, ref)
        driver.set_active(name)
        want = oracle(layers, x, [ref])
        expect_close(
            "SW-FORWARD-2", driver.forward(x), want, sc.dtype, f"{name} targets {list(ref.weights)}"
        )


def _dtype_cases(driver):
    return st.sampled_from(supported_dtypes(driver)).flatmap(lambda dt: scenarios(driver, dtype=dt))


@clause("SW-TOL-1", cases=_dtype_cases)
def check_tolerance_each_dtype(driver, sc: Scenario) -> None:
    """SW-TOL-1: in every declared dtype, the output is within tol(dtype) of the oracle."""
    _single(driver, sc, "SW-TOL-1", f"forward in {sc.dtype}")


@clause(
    "SW-DTYPE-1",
    needs={"dtype:bfloat16"},
    cases=lambda d: scenarios(d, dtype="bfloat16"),
)
def check_bfloat16_output(driver, sc: Scenario) -> None:
    """SW-DTYPE-1: a bfloat16 model returns bfloat16 values, within tol(bfloat16) of the oracle."""
    adapters = load(driver, sc)
    driver.set_active("a0")
    x = sc.x()
    y = np.asarray(driver.forward(x)).astype(np.float64)
    expect_equal("SW-DTYPE-1", round_to(y, "bfloat16"), y, "bfloat16 output (cast back once)")
    want = oracle(sc.layers(), x, [adapters["a0"]])
    expect_close("SW-DTYPE-1", y, want, "bfloat16", "bfloat16 forward")


def _padding_case(driver):
    return st.tuples(scenarios(driver, patterns=False), st.sampled_from((1, 3)))


@clause("SW-CONFORM-1", cases=_padding_case)
def check_rank_padding(driver, case) -> None:
    """SW-CONFORM-1: zero-padding A and B to a larger rank (same scale) changes no output."""
    sc, extra = case
    layers = sc.layers()
    build(driver, sc, layers)
    plain, padded = sc.adapter(0), sc.adapter(0, pad_rank=extra)
    driver.add_adapter("plain", plain)
    driver.add_adapter("padded", padded)
    x = sc.x()
    driver.set_active("plain")
    y_plain = driver.forward(x)
    driver.set_active("padded")
    y_padded = driver.forward(x)
    expect_close("SW-CONFORM-1", y_padded, oracle(layers, x, [plain]), sc.dtype, f"rank +{extra}")
    expect_close("SW-CONFORM-1", y_padded, y_plain, sc.dtype, "padded vs unpadded")


@clause("SW-CONFORM-2", cases=lambda d: scenarios(d))
def check_target_union(driver, sc: Scenario) -> None:
    """SW-CONFORM-2: zero A/B on layers an adapter does not target change no output."""
    layers = sc.layers()
    build(driver, sc, layers)
    plain, widened = sc.adapter(0), sc.adapter(0, zero_layers=True)
    driver.add_adapter("plain", plain)
    driver.add_adapter("widened", widened)
    x = sc.x()
    driver.set_active("widened")
    y = driver.forward(x)
    expect_close("SW-CONFORM-2", y, oracle(layers, x, [plain]), sc.dtype, "zero layers added")
    driver.set_active("plain")
    expect_close("SW-CONFORM-2", y, driver.forward(x), sc.dtype, "widened vs plain")


@clause(
    "SW-CONFORM-3",
    needs={"compile_count"},
    cases=lambda d: scenarios(d, n_adapters=(2, 3), batches=(2,)),
)
def check_one_compilation(driver, sc: Scenario) -> None:
    """SW-CONFORM-3: switching among the adapters of a bank compiles the forward at most once."""
    load(driver, sc)
    x = sc.x()
    before = driver.compile_count()
    for name in sc.names() + sc.names()[::-1]:
        driver.set_active(name)
        driver.forward(x)
    added = driver.compile_count() - before
    expect(
        "SW-CONFORM-3",
        added <= 1,
        f"{added} compilations to serve {len(sc.names())} adapters of ranks "
        f"{[a.rank for a in sc.adapters]} (at most 1 allowed)",
    )
