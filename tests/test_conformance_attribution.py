"""Attribution (SW-SUITE-10): one primary clause per failing check; what only fails because of
it is reported "blocked", with the clause that blocks it."""

from __future__ import annotations

import pytest
from broken_drivers import LastLayerTanhDriver, RsloraIgnoredDriver, StaleDeleteDriver
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.attribution import OWNER_ORDER, DriverView
from conformance.drivers.reference import ReferenceDriver
from conformance.registry import CHECKS
from conformance.runner import RunConfig, run_suite
from conformance.strategies import PSEUDO_FEATURES, adapter_specs

PATHS = ("blocks.0.q", "blocks.0.o")


def _failing(report) -> dict[str, str]:
    return {c.name: c.clause for c in report.checks if c.status == "fail"}


@pytest.mark.clause("SW-SUITE-10")
def test_one_wrong_rslora_scale_fails_one_clause():
    """SW-SUITE-10, SW-SCALE-2: a driver whose only bug is the rsLoRA scale fails SW-SCALE-2
    alone; the checks of other clauses that draw rsLoRA adapters pass without them and are
    `blocked` by SW-SCALE-2 (JSON `blocked_by`), and so are their clauses."""
    clauses = "SW-SCALE-1,SW-SCALE-2,check_forward_*,check_merge,check_delete,check_target_union"
    report = run_suite(RsloraIgnoredDriver(), RunConfig(max_examples=6, clauses=clauses))
    assert set(_failing(report).values()) == {"SW-SCALE-2"}, _failing(report)
    table = {cid: e["status"] for cid, e in report.clauses.items()}
    assert table["SW-SCALE-2"] == "fail" and table["SW-SCALE-1"] == "pass"
    for cid in ("SW-FORWARD-1", "SW-MERGE-1", "SW-BANK-2", "SW-CONFORM-2"):
        assert table[cid] == "blocked", (cid, report.clauses[cid])
        assert report.clauses[cid]["message"].startswith("blocked by SW-SCALE-2 ")
    blocked = [c for c in report.to_json()["checks"] if c["status"] == "blocked"]
    assert len(blocked) >= 4 and all(c["blocked_by"] == ["SW-SCALE-2"] for c in blocked)
    assert report.failed


class _TwoBugs(RsloraIgnoredDriver, StaleDeleteDriver):
    """rsLoRA scale ignored, and a deleted active adapter keeps its delta."""


@pytest.mark.clause("SW-SUITE-10")
def test_a_failure_of_its_own_is_not_blocked():
    """SW-SUITE-10, SW-BANK-2: with a second, independent bug, the check that still fails in a
    world without rsLoRA keeps `fail` on its own clause, with the smaller world's
    counterexample."""
    report = run_suite(_TwoBugs(), RunConfig(clauses="SW-SCALE-2,check_delete"))
    failing = _failing(report)
    assert failing == {"check_rslora_scale": "SW-SCALE-2", "check_delete": "SW-BANK-2"}
    delete = next(c for c in report.checks if c.name == "check_delete")
    assert "also without ['rslora']" in delete.message and "rslora" not in delete.counterexample
    assert report.clauses["SW-BANK-2"]["status"] == "fail"


@pytest.mark.clause("SW-SUITE-10")
def test_a_broken_chain_is_a_model_failure():
    """SW-SUITE-10, SW-MODEL-1: a driver with `tanh` after the last layer fails SW-MODEL-1 in
    every check (the base model is checked first), not the clause each check is about."""
    clauses = "SW-SCALE-1,SW-FORWARD-2,SW-CONFORM-1,SW-BANK-1,SW-MERGE-2,SW-ACTIVE-2"
    report = run_suite(LastLayerTanhDriver(), RunConfig(max_examples=3, clauses=clauses))
    assert set(_failing(report).values()) == {"SW-MODEL-1"}, _failing(report)
    assert report.clauses["SW-SCALE-1"]["status"] == "blocked"


@pytest.mark.clause("SW-SUITE-10")
def test_every_owned_feature_has_one_owner_in_order():
    """SW-SUITE-10: each feature of OWNER_ORDER is owned by exactly one registered check, and
    every owned feature is in the order (so owners are resolved without cycles)."""
    owners = {c.owns: c.name for c in CHECKS if c.owns}
    assert set(owners) == set(OWNER_ORDER), owners
    assert owners["rslora"] == "check_rslora_scale" and owners["scaled"] == "check_default_scale"


@pytest.mark.clause("SW-SUITE-10")
def test_driver_view_switches_features_off():
    """SW-SUITE-10: a DriverView hides capabilities and pseudo-features from the strategies
    (no rsLoRA adapter, every scale 1) and is the driver for everything else."""
    driver = ReferenceDriver()
    view = DriverView(driver, {"rslora", "scaled"})
    assert "rslora" not in view.capabilities and "mixed" in view.capabilities
    assert view.suite_features_off == {"scaled"} and "scaled" in PSEUDO_FEATURES
    assert view.build == driver.build and view.name == "reference"

    @settings(max_examples=25, database=None, deadline=None)
    @given(st.data())
    def drawn(data):
        full = data.draw(adapter_specs(driver, PATHS))
        restricted = data.draw(adapter_specs(view, PATHS))
        assert not restricted.rslora and restricted.rank == 1 and restricted.alpha == 1.0
        assert all(v == 1 for _, v in restricted.rank_pattern)
        assert full.rank >= 1

    drawn()
