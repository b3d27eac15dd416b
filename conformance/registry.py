"""The check registry: every check names the spec clauses it verifies.

A *check* is a function `check(driver, case)` run by Hypothesis over `case`s drawn from a
strategy (or a `RuleBasedStateMachine`). It is registered with `@clause(...)`; a failed
expectation raises `ClauseFailure`, which carries the clause it violates, so a check that
verifies several clauses still names the right one.

Example:
    >>> from hypothesis import strategies as st
    >>> @clause("SW-EXAMPLE-1", cases=lambda driver: st.just(1), register=False)
    ... def check_example(driver, case):
    ...     expect("SW-EXAMPLE-1", case == 1, "case must be 1")
    >>> check_example.clauses
    ('SW-EXAMPLE-1',)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["CHECKS", "NOT_APPLICABLE", "Check", "ClauseFailure", "clause", "expect"]


class ClauseFailure(AssertionError):
    """A driver's behaviour contradicts clause `clause_id`."""

    def __init__(self, clause_id: str, message: str):
        super().__init__(f"{clause_id}: {message}")
        self.clause_id = clause_id
        self.message = message


def expect(clause_id: str, condition: Any, message: str) -> None:
    """Raise `ClauseFailure(clause_id, message)` unless `condition` holds."""
    if not condition:
        raise ClauseFailure(clause_id, message)


@dataclasses.dataclass(frozen=True)
class Check:
    """One registered check.

    Arguments:
        name: the function name (`check_default_scale`): the id used by skip/xfail files.
        clauses: the clause IDs it verifies, the primary one first.
        needs: capabilities (see `conformance.driver.CAPABILITIES`) the driver must declare.
        fn: `fn(driver, case)`; None for a state machine.
        cases: `cases(driver) -> strategy` of the cases to draw.
        machine: a `RuleBasedStateMachine` subclass taking the driver, for stateful checks.
        clause_needs: extra capabilities per clause: without them the check still runs but does
            not count as covering that clause (a state machine skips those rules).
        owns: the feature of the generated world this check verifies in isolation (a
            capability such as "rslora", or a pseudo-feature such as "layouts", see
            `conformance.strategies.on`); when it fails on its primary clause, other failing
            checks are re-run without the feature (`conformance.attribution`).
        examples: `examples(driver) -> list of cases` always run first (known hard cases).
    """

    name: str
    clauses: tuple[str, ...]
    needs: frozenset[str]
    fn: Callable[[Any, Any], None] | None = None
    cases: Callable[[Any], Any] | None = None
    machine: Callable[[Any], Any] | None = None
    clause_needs: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    owns: str | None = None
    examples: Callable[[Any], list] | None = None

    @property
    def primary(self) -> str:
        """The clause this check is mainly about (the first one registered)."""
        return self.clauses[0]

    def covered(self, capabilities: Iterable[str]) -> tuple[str, ...]:
        """The clauses this check verifies for a driver with `capabilities`."""
        caps = set(capabilities)
        return tuple(c for c in self.clauses if self.clause_needs.get(c, frozenset()) <= caps)

    def missing(self, capabilities: Iterable[str]) -> list[str]:
        """The capabilities this check needs that `capabilities` lacks."""
        return sorted(self.needs - set(capabilities))


#: Every registered check, in registration order (the order of the report).
CHECKS: list[Check] = []

#: Clauses of the spec that no driver can show (they are about a project, not an
#: implementation's behaviour): `clause ID -> reason`, reported as "not applicable".
NOT_APPLICABLE: dict[str, str] = {
    "SW-SPEC-1": "about the traceability of a project's own tests, not observable by a driver",
}


def clause(
    *clause_ids: str,
    needs: Iterable[str] = (),
    cases: Callable[[Any], Any] | None = None,
    clause_needs: dict[str, Iterable[str]] | None = None,
    owns: str | None = None,
    examples: Callable[[Any], list] | None = None,
    register: bool = True,
) -> Callable[[Callable], Check]:
    """Register a check under the clauses it verifies (primary clause first).

    Decorates either a function `fn(driver, case)` (give `cases=`) or a
    `RuleBasedStateMachine` subclass whose `__init__` takes the driver (no `cases=`).

    Arguments:
        clause_ids: one or more `SW-...` IDs.
        needs: driver capabilities required; without them the check is "not supported".
        cases: `cases(driver)` returns the Hypothesis strategy of cases.
        clause_needs: per-clause extra capabilities (see `Check.clause_needs`).
        owns: the world feature this check verifies in isolation (see `Check.owns`).
        examples: `examples(driver)`: cases always run (see `Check.examples`).
        register: add the check to `CHECKS` (False for ad-hoc checks).
    """
    if not clause_ids:
        raise ValueError("@clause needs at least one clause ID, e.g. @clause('SW-SCALE-1').")

    def wrap(fn: Callable) -> Check:
        ids, caps = tuple(clause_ids), frozenset(needs)
        extra = {
            "clause_needs": {c: frozenset(n) for c, n in (clause_needs or {}).items()},
            "owns": owns,
            "examples": examples,
        }
        if isinstance(fn, type):
            check = Check(fn.__name__, ids, caps, machine=fn, **extra)
        elif cases is None:
            raise ValueError(f"@clause on {fn.__name__}: give `cases=` (a strategy factory).")
        else:
            check = Check(fn.__name__, ids, caps, fn=fn, cases=cases, **extra)
        if register:
            if any(c.name == check.name for c in CHECKS):
                raise ValueError(f"a check named {check.name!r} is already registered.")
            if owns is not None and any(c.owns == owns for c in CHECKS):
                raise ValueError(f"feature {owns!r} already has an owning check.")
            CHECKS.append(check)
        return check

    return wrap
