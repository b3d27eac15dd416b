"""Attribution: one primary clause per failing check; what fails only because of it is "blocked".

A few checks each verify one *feature* of the generated world in isolation (`Check.owns`):
the scale alpha / r ("scaled"), rsLoRA, colliding layer paths ("layouts"), rank/alpha
patterns, non-identifier adapter names ("names"), several active adapters, mixed batches,
merges and `cat` combinations. Every other check draws all of them. When an owning check fails
on its primary clause, every other failing check is run again, with the same seed, in a world
without that feature (`DriverView`): if it then passes, its failure only came from the broken
feature and it is reported `blocked` by the owner's clause; if it still fails, the failure is
its own and the report shows the smaller world's counterexample (specs/conformance.md,
SW-SUITE-10). Owners are resolved in `OWNER_ORDER`, each blocked only by owners before it, so
there are no cycles.

Example:
    >>> from conformance.drivers.reference import ReferenceDriver
    >>> view = DriverView(ReferenceDriver(), {"rslora", "layouts"})
    >>> "rslora" in view.capabilities, sorted(view.suite_features_off), view.name
    (False, ['layouts'], 'reference')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .registry import Check
from .strategies import PSEUDO_FEATURES, on

__all__ = ["OWNER_ORDER", "DriverView", "attribute"]

#: Owned features, most basic first: an owner is only ever blocked by owners before it.
OWNER_ORDER = (
    "scaled",
    "rslora",
    "layouts",
    "patterns",
    "names",
    "multi_active",
    "mixed",
    "merge",
    "combine_cat",
)


class DriverView:
    """`driver` as the strategies see it with `off` features removed: capabilities leave
    `capabilities`, pseudo-features (`PSEUDO_FEATURES`) go to `suite_features_off`. Every
    other attribute is the driver's own."""

    def __init__(self, driver, off: Iterable[str]) -> None:
        off = frozenset(off)
        self._driver = driver
        self.capabilities = frozenset(driver.capabilities) - off
        self.suite_features_off = (
            frozenset(getattr(driver, "suite_features_off", ())) | off & PSEUDO_FEATURES
        )

    def __getattr__(self, name: str):
        return getattr(self._driver, name)


def _order(pairs: list) -> list:
    def key(item):
        check = item[0]
        return OWNER_ORDER.index(check.owns) if check.owns in OWNER_ORDER else len(OWNER_ORDER)

    return sorted(pairs, key=key)  # stable: registration order within a rank


def attribute(
    pairs: list,
    driver,
    rerun: Callable[[Check, DriverView], object],
    fail: str = "fail",
    passed: str = "pass",
    blocked: str = "blocked",
) -> None:
    """Re-attribute the failing `(check, result)` pairs in place (see the module doc).

    Arguments:
        pairs: every check run, with its `runner.CheckResult`.
        driver: the driver they ran against.
        rerun: `rerun(check, view)` runs one check again against a `DriverView`.
        fail, passed, blocked: the status names (`conformance.runner`).
    """
    broken: dict[str, tuple[str, str]] = {}  # feature -> (owning check, its failing clause)
    for check, result in _order(pairs):
        if result.status != fail:
            continue
        rank = OWNER_ORDER.index(check.owns) if check.owns in OWNER_ORDER else len(OWNER_ORDER)
        off = {
            f
            for f in broken
            if OWNER_ORDER.index(f) < rank and f not in check.needs and on(driver, f)
        }
        if off:
            again = rerun(check, DriverView(driver, off))
            if again.status == passed:
                owners = sorted({broken[f] for f in off}, key=lambda o: o[1])
                result.status = blocked
                result.blocked_by = [clause for _, clause in owners]
                result.message = (
                    f"blocked by {', '.join(f'{c} ({n})' for n, c in owners)}: passes without "
                    f"{sorted(off)} (first failure: {result.clause}: {result.message})"
                )
                continue
            if again.status == fail:
                result.clause, result.message = again.clause, again.message
                result.counterexample = again.counterexample
                result.message += f" (also without {sorted(off)})"
        if check.owns is not None and result.clause == check.primary:
            broken[check.owns] = (check.name, result.clause)
