"""The suite can fail: each deliberately broken driver is caught on the right clause (SW-SUITE-3).

The broken drivers live in `tests/broken_drivers.py`; each breaks one rule of
`specs/switching.md` and `CAUGHT_BY` names the clause the report must mark as failing.
"""

from __future__ import annotations

import pytest
from broken_drivers import CAUGHT_BY

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
