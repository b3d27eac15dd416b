"""Each registered check as one pytest test, named `<primary clause>::<check>`.

Run with `pytest conformance --driver NAME` (see `conformance/conftest.py`).
"""

from __future__ import annotations

import pytest

from conformance.registry import CHECKS
from conformance.runner import FAIL, SKIPPED, UNSUPPORTED, XFAIL, XPASS, run_suite


@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.clauses[0]}::{c.name}" for c in CHECKS])
def test_clause(check, driver, run_config) -> None:
    """The check's clauses (`check.clauses`) hold for the driver."""
    result = run_suite(driver, run_config, checks=[check]).checks[0]
    if result.status in (UNSUPPORTED, SKIPPED):
        pytest.skip(f"{result.status}: {result.message}")
    if result.status == XFAIL:
        pytest.xfail(f"{result.clause}: {result.message}")
    if result.status == FAIL:
        pytest.fail(f"{result.clause}: {result.message}\n{result.counterexample}", pytrace=False)
    assert result.status in ("pass", XPASS)
