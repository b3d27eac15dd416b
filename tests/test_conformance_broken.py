"""The suite can fail: each deliberately broken driver is caught on the right clause (SW-SUITE-3).

The broken drivers live in `tests/broken_drivers.py`; each breaks one rule of
`specs/switching.md` and `CAUGHT_BY` names the clause the report must mark as failing.
"""

from __future__ import annotations

import numpy as np
import pytest
from broken_drivers import CAUGHT_BY

from conformance.drivers.reference import ReferenceDriver
from conformance.runner import RunConfig, run_suite


@pytest.mark.parametrize(
    "broken, clause_id",
    [
        pytest.param(cls, cid, id=cls.__name__, marks=pytest.mark.clause(cid))
        for cls, cid in CAUGHT_BY.items()
    ],
)
@pytest.mark.clause("SW-SUITE-3")
def test_broken_driver_fails_its_clause(broken, clause_id):
    """SW-SUITE-3 (and the parametrized clause): the broken driver's report marks exactly the
    broken clause as failing, with a message and a shrunk counterexample."""
    report = run_suite(broken(), RunConfig(max_examples=8, clauses=clause_id))
    entry = report.clauses[clause_id]
    assert entry["status"] == "fail", entry
    assert report.failed
    failing = [c for c in report.checks if c.status == "fail"]
    assert {c.clause for c in failing} == {clause_id}
    assert all(c.message and c.counterexample for c in failing)


class LossyUnmergeDriver(ReferenceDriver):
    """Declares "exact_unmerge" but restores the base from a float32 copy on unmerge."""

    def unmerge(self):
        super().unmerge()
        self._layers = [
            (p, w.astype(np.float32).astype(self._dtype), c) for p, w, c in self._layers
        ]


@pytest.mark.clause("SW-MERGE-2")
def test_inexact_unmerge_in_sequences_is_a_merge_2_failure():
    """SW-MERGE-2 (and SW-SUITE-3): in the operation-sequence machine, a driver that declares
    "exact_unmerge" but does not return bitwise after merge + unmerge violates SW-MERGE-2, the
    clause that promises the exact return, not SW-HISTORY-1."""
    driver = LossyUnmergeDriver()
    assert "exact_unmerge" in driver.capabilities
    report = run_suite(driver, RunConfig(max_examples=20, clauses="OperationSequences"))
    (check,) = report.checks
    assert check.status == "fail", check
    assert check.clause == "SW-MERGE-2", check
    assert "after merge + unmerge" in check.message and check.counterexample
    assert report.clauses["SW-MERGE-2"]["status"] == "fail"
