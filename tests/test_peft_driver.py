"""The `peft` conformance driver maps the protocol onto PEFT's public API (spec SW-IO-11)."""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxlora import reference
from jaxlora.reference import RefAdapter

pytest.importorskip("torch")
pytest.importorskip("peft")
from conformance.drivers.peft_driver import PeftDriver

REPORT = Path(__file__).resolve().parent.parent / "specs" / "peft-deviations.md"
PATHS = ["blocks.0.q", "blocks.0.o", "head"]
WIDTHS = [4, 6, 5, 3]


def scenario(seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = [
        (p, rng.normal(size=(WIDTHS[i], WIDTHS[i + 1])) / 2, rng.normal(size=WIDTHS[i + 1]) / 2)
        for i, p in enumerate(PATHS)
    ]

    def factors(path, r):
        i = PATHS.index(path)
        return rng.normal(size=(WIDTHS[i], r)), rng.normal(size=(r, WIDTHS[i + 1]))

    adapters = {
        "first": RefAdapter(2, 3.0, {p: factors(p, 2) for p in PATHS[:2]}),
        "second": RefAdapter(
            3, 2.0, {"blocks.0.q": factors("blocks.0.q", 1), "head": factors("head", 3)},
            use_rslora=True, rank_pattern={"q": 1}, alpha_pattern={"head": 5.0},
        ),
    }  # fmt: skip
    return layers, adapters, rng.normal(size=(3, WIDTHS[0]))


def loaded(dtype: str = "float64"):
    layers, adapters, x = scenario()
    driver = PeftDriver()
    driver.build(layers, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, adapter in adapters.items():
            driver.add_adapter(name, adapter)
    return driver, layers, adapters, x


def assert_oracle(y, layers, x, active, dtype="float64"):
    ok, err, allowed = reference.allclose(y, reference.chain_forward(layers, x, active), dtype)
    assert ok, f"max error {err:.3g} > {allowed:.3g}"


@pytest.mark.clause("SW-IO-11")
def test_forward_single_several_none_and_mixed():
    """SW-IO-11: set_adapter, base_model.set_adapter(list), disable_adapter and adapter_names
    give the oracle's outputs (float64)."""
    driver, layers, adapters, x = loaded()
    assert_oracle(driver.forward(x), layers, x, [])  # added adapters are not active
    for active in ("first", "second", ["second", "first"]):
        driver.set_active(active)
        names = [active] if isinstance(active, str) else active
        assert_oracle(driver.forward(x), layers, x, [adapters[n] for n in names])
    driver.set_active(None)
    base = driver.forward(x)
    assert_oracle(base, layers, x, [])
    rows = ["first", None, "second"]
    y = driver.forward_mixed(x, rows)
    want = reference.mixed_forward(layers, x, [None if r is None else adapters[r] for r in rows])
    assert reference.allclose(y, want, "float64")[0]
    assert np.array_equal(driver.forward(x), base)  # the mixed call left the state alone


@pytest.mark.clause("SW-IO-11")
def test_merge_combine_and_versions():
    """SW-IO-11: merge_adapter / unmerge_adapter and add_weighted_adapter('cat') match the
    oracle; versions() names torch and peft."""
    driver, layers, adapters, x = loaded("float32")
    driver.set_active("first")
    driver.merge()
    merged = dict((p, w) for p, w, _ in reference.merge(layers, [adapters["first"]]))
    for path, kernel in driver.base_kernels().items():
        assert reference.allclose(kernel, merged[path], "float32")[0], path
    assert_oracle(driver.forward(x), layers, x, [adapters["first"]], "float32")
    driver.unmerge()
    for path, kernel in driver.base_kernels().items():
        assert reference.allclose(kernel, dict((p, w) for p, w, _ in layers)[path], "float32")[0]
    driver.combine("both", ["first", "second"], [1.0, 0.5], "cat")
    driver.set_active("both")
    cat = reference.combine_cat([adapters["first"], adapters["second"]], [1.0, 0.5])
    assert_oracle(driver.forward(x), layers, x, [cat], "float32")
    assert set(driver.versions()) == {"peft", "torch"}


@pytest.mark.clause("SW-IO-11")
def test_driver_refuses_misfit_shapes_before_peft():
    """SW-IO-11: A/B that do not fit a layer are refused before PEFT is touched."""
    driver, _, adapters, _ = loaded()
    a, b = adapters["first"].weights["blocks.0.q"]
    with pytest.raises(ValueError, match=r"'bad', layer 'blocks.0.q'"):
        driver.add_adapter("bad", RefAdapter(2, 1.0, {"blocks.0.q": (a[:-1], b)}))
    with pytest.raises(ValueError, match="bad"):
        driver.set_active("bad")


@pytest.mark.clause("SW-IO-11")
def test_import_without_torch_is_a_clean_import_error(monkeypatch):
    """SW-IO-11: without torch, importing the driver raises ImportError saying what to install."""
    monkeypatch.setitem(sys.modules, "torch", None)
    spec = importlib.util.find_spec("conformance.drivers.peft_driver")
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match="needs torch and peft"):
        spec.loader.exec_module(module)


@pytest.mark.clause("SW-IO-11")
def test_an_adapter_targets_only_its_own_paths_when_paths_collide():
    """SW-IO-11: with layers `q` and `blocks.0.q`, an adapter for `q` alone changes only `q`
    (PEFT's list rule would also wrap `blocks.0.q`, with random factors, so the driver passes
    a regex that fullmatch-es exactly the adapter's paths then)."""
    rng = np.random.default_rng(1)
    layers = [(p, rng.normal(size=(3, 3)) / 2, rng.normal(size=3) / 2) for p in ("q", "blocks.0.q")]
    adapter = RefAdapter(1, 2.0, {"q": (rng.normal(size=(3, 1)), rng.normal(size=(1, 3)))})
    driver = PeftDriver()
    driver.build(layers, "float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        driver.add_adapter("a", adapter)
    driver.set_active("a")
    x = rng.normal(size=(2, 3))
    assert_oracle(driver.forward(x), layers, x, [adapter])


@pytest.mark.clause("SW-SUITE-8")
def test_deviation_scripts_reproduce_with_peft_alone():
    """SW-SUITE-8: every standalone script in the appendix of specs/peft-deviations.md runs
    with the installed PEFT and its assertion (the deviation) holds; one that fails means PEFT
    changed: regenerate the report and update its explanations."""
    text = REPORT.read_text(encoding="utf-8")
    scripts = re.findall(r"```python\n(.*?)```", text[text.index("## Appendix") :], re.S)
    assert len(scripts) >= 6
    for i, script in enumerate(scripts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(script, f"peft-deviations.md script {i}", "exec"), {"__name__": "x"})
