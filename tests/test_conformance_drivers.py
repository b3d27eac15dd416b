"""The conformance suite against its built-in drivers and a third-party driver (SW-SUITE-*).

The `reference` and `jaxlora` drivers must pass every clause of `specs/switching.md` that they
declare the capabilities for; each clause is one test (marked with its ID).
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from conformance.drivers.reference import ReferenceDriver
from conformance.loader import DriverLoadError, driver_problems, load_driver
from conformance.registry import CHECKS, NOT_APPLICABLE, Check
from conformance.runner import RunConfig, check_seed, run_suite, spec_clauses
from jaxlora.errors import ConfigError

SPEC = list(spec_clauses())
OBSERVABLE = [c for c in SPEC if c not in NOT_APPLICABLE]
#: clauses a driver may report "not supported" (capability not declared)
UNSUPPORTED_OK = {"reference": {"SW-DTYPE-1", "SW-CONFORM-3"}, "jaxlora": set()}


@pytest.fixture(scope="module")
def reports():
    """One small run per built-in driver (cached for the module)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config = RunConfig(max_examples=4, steps=8)
            cache[name] = run_suite(load_driver(name), config).to_json()
        return cache[name]

    return get


@pytest.mark.parametrize("driver_name", ["reference", "jaxlora"])
@pytest.mark.parametrize(
    "clause_id", [pytest.param(c, marks=pytest.mark.clause(c)) for c in OBSERVABLE]
)
@pytest.mark.clause("SW-SUITE-2")
def test_builtin_driver_passes_clause(reports, driver_name, clause_id):
    """Each clause of specs/switching.md (parametrized; SW-SUITE-2 for unsupported ones) holds
    for the reference and jaxlora drivers."""
    entry = reports(driver_name)["clauses"][clause_id]
    allowed = {"pass"} | ({"not supported"} if clause_id in UNSUPPORTED_OK[driver_name] else set())
    assert entry["status"] in allowed, f"{driver_name} {clause_id}: {entry}"
    if entry["status"] == "not supported":
        assert "lacks capability" in entry["message"]


@pytest.mark.clause("SW-SUITE-5")
def test_report_names_versions_and_checks(reports):
    """SW-SUITE-5: the JSON report carries the driver, its versions and every check."""
    report = reports("jaxlora")
    assert report["driver"] == "jaxlora" and report["status"] == "passed"
    assert {"jaxlora", "jax"} <= set(report["versions"])
    assert [c["name"] for c in report["checks"]] == [c.name for c in CHECKS]
    assert sum(report["summary"].values()) == len(report["clauses"])


@pytest.mark.clause("SW-SUITE-4")
def test_every_spec_clause_has_a_check():
    """SW-SUITE-4: every clause of specs/switching.md is covered by a registered check or
    declared not applicable (then reported so)."""
    covered = {cid for check in CHECKS for cid in check.clauses}
    assert SPEC, "specs/switching.md was not found or has no clauses"
    assert set(SPEC) <= covered | set(NOT_APPLICABLE), sorted(set(SPEC) - covered)
    assert not covered & set(NOT_APPLICABLE)


_THIRD_PARTY = """
from conformance.drivers.reference import ReferenceDriver


class VendorDriver(ReferenceDriver):
    name = "vendor"
    capabilities = frozenset({"dtype:float32", "multi_active"})


def make_driver():
    return VendorDriver()
"""


@pytest.mark.clause("SW-SUITE-1")
def test_third_party_driver_by_file_and_module(tmp_path, monkeypatch):
    """SW-SUITE-1: a driver in a file (`path.py:factory`) or module (`module:factory`) runs;
    capabilities it does not declare are "not supported"."""
    (tmp_path / "vendor_lora_driver.py").write_text(textwrap.dedent(_THIRD_PARTY))
    by_file = load_driver(f"{tmp_path / 'vendor_lora_driver.py'}:make_driver")
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = load_driver("vendor_lora_driver:make_driver")
    for driver in (by_file, by_module):
        assert driver.name == "vendor"
        report = run_suite(driver, RunConfig(max_examples=2, clauses="SW-FORWARD-*,SW-MIXED-1"))
        statuses = {cid: e["status"] for cid, e in report.clauses.items()}
        assert statuses["SW-FORWARD-1"] == statuses["SW-FORWARD-2"] == "pass"
        assert statuses["SW-MIXED-1"] == "not supported"
        assert not report.failed
    sys.modules.pop("vendor_lora_driver", None)


class _Incomplete:
    name = "incomplete"
    capabilities = frozenset({"mixed", "teleport"})

    def build(self, layers, dtype): ...


@pytest.mark.clause("SW-SUITE-1")
def test_incomplete_driver_is_refused(tmp_path, monkeypatch):
    """SW-SUITE-1: missing members, unknown capabilities and capabilities without their methods
    are listed before anything runs."""
    problems = driver_problems(_Incomplete())
    assert "add_adapter" in problems[0] and "set_active" in problems[0]
    assert any("teleport" in p for p in problems)
    assert any("'mixed'" in p and "forward_mixed" in p for p in problems)
    (tmp_path / "incomplete_driver.py").write_text(
        "class Incomplete:\n    name = 'x'\n    capabilities = frozenset()\n"
    )
    with pytest.raises(DriverLoadError, match="missing members"):
        load_driver(f"{tmp_path / 'incomplete_driver.py'}:Incomplete")
    with pytest.raises(DriverLoadError, match="no callable 'nope'"):
        load_driver(f"{tmp_path / 'incomplete_driver.py'}:nope")
    with pytest.raises(DriverLoadError, match="unknown driver"):
        load_driver("no-such-driver")
    with pytest.raises(DriverLoadError, match="cannot import"):
        load_driver("no_such_module_xyz:Driver")
    with pytest.raises(DriverLoadError, match="does not exist"):
        load_driver(f"{tmp_path / 'missing.py'}:Driver")


@pytest.mark.clause("SW-SUITE-7")
def test_runs_are_reproducible():
    """SW-SUITE-7: the same settings give the same report; --seed changes the examples."""
    from broken_drivers import UnknownIsBaseDriver

    def run(seed):
        config = RunConfig(max_examples=4, clauses="check_unknown_name", seed=seed)
        check = run_suite(UnknownIsBaseDriver(), config).checks[0]
        return check.status, check.counterexample

    first = run(None)
    assert first[0] == "fail" and first[1]
    assert run(None) == first
    assert run(12345)[0] == "fail"


def _drawn(run_seed):
    """The integers a one-check run draws with `run_seed` (RunConfig.seed)."""
    from hypothesis import strategies as st

    drawn = []
    check = Check(
        "check_record_draws",
        ("SW-SUITE-7",),
        frozenset(),
        fn=lambda driver, case: drawn.append(case),
        cases=lambda driver: st.integers(0, 2**62),
    )
    run_suite(ReferenceDriver(), RunConfig(max_examples=5, seed=run_seed), checks=[check])
    return drawn


@pytest.mark.clause("SW-SUITE-7")
def test_seed_zero_is_a_seed():
    """SW-SUITE-7: --seed 0 changes the examples like any other seed (it is not the default run);
    the same seed repeats them; different seeds give different check seeds."""
    assert _drawn(None) == _drawn(None)
    assert _drawn(0) == _drawn(0)
    assert _drawn(0) != _drawn(None)
    assert _drawn(1) != _drawn(0)
    seeds = {check_seed("check_x", s) for s in (None, 0, 1, -1, 2, -2)}
    assert len(seeds) == 6


@pytest.mark.clause("SW-SUITE-7")
def test_run_config_refuses_no_examples():
    """SW-SUITE-7: max_examples and steps below 1 are refused with a ConfigError naming the
    setting and the bad value (not run, and not blamed on the driver)."""
    with pytest.raises(ConfigError, match=r"max_examples \(--max-examples\) must be .*>= 1, got 0"):
        RunConfig(max_examples=0)
    with pytest.raises(ConfigError, match=r"steps \(--steps\) must be .*>= 1, got -3"):
        RunConfig(steps=-3)


@pytest.mark.clause("SW-SUITE-2")
def test_unsupported_checks_do_not_call_the_driver():
    """SW-SUITE-2: a check needing an undeclared capability never touches the driver."""

    class Untouchable(ReferenceDriver):
        capabilities = frozenset({"dtype:float64"})

        def forward_mixed(self, x, rows):
            raise AssertionError("forward_mixed called without the 'mixed' capability")

    report = run_suite(Untouchable(), RunConfig(max_examples=2, clauses="SW-MIXED-*"))
    assert {e["status"] for e in report.clauses.values()} == {"not supported"}
