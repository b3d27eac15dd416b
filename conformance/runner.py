"""Run the registered checks against a driver and build the clause-by-clause report.

Example:
    >>> from conformance.drivers.reference import ReferenceDriver
    >>> report = run_suite(ReferenceDriver(), RunConfig(max_examples=2, clauses="SW-SCALE-1"))
    >>> report.clauses["SW-SCALE-1"]["status"]
    'pass'
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import errors as hypothesis_errors
from hypothesis.stateful import run_state_machine_as_test

from jaxlora.errors import ConfigError

from . import checks as _checks  # noqa: F401  (registers the checks)
from .attribution import attribute
from .registry import CHECKS, NOT_APPLICABLE, Check, ClauseFailure

__all__ = [
    "SPEC_PATH",
    "CheckResult",
    "Report",
    "RunConfig",
    "check_seed",
    "read_id_file",
    "run_check",
    "run_suite",
    "spec_clauses",
]

#: The normative spec the checks cite (absent from an installed wheel: clause titles then empty).
SPEC_PATH = Path(__file__).resolve().parent.parent / "specs" / "switching.md"
_HEADING = re.compile(r"^### (SW-[A-Z]+-\d+) — (.+)$", re.MULTILINE)

#: Result statuses (checks and clauses). Only "fail" makes a run fail.
PASS, FAIL, UNSUPPORTED, SKIPPED, XFAIL, XPASS = (
    "pass",
    "fail",
    "not supported",
    "skipped",
    "xfail",
    "xpass",
)
BLOCKED, UNCOVERED, NOT_APPLICABLE_STATUS = "blocked", "not covered", "not applicable"


@dataclasses.dataclass
class RunConfig:
    """How to run the suite.

    Arguments:
        max_examples: Hypothesis examples per check (state machine: sequences).
        steps: operations per state machine sequence.
        seed: None derandomizes (a fixed seed per check); any int, 0 included, gives every check
            a different seed (see `check_seed`).
        clauses: comma-separated globs matched against clause IDs and check names.
        skips, xfails: ids (globs of check names or primary clause IDs) to skip / expect to fail.
        shrink: shrink failures to the smallest counterexample (off in the mutation harness,
            which only needs to know that a check fails).

    Raises:
        ConfigError: `max_examples` or `steps` is below 1.
    """

    max_examples: int = 8
    steps: int = 10
    seed: int | None = None
    clauses: str | None = None
    skips: tuple[str, ...] = ()
    xfails: tuple[str, ...] = ()
    shrink: bool = True

    def __post_init__(self) -> None:
        for field, flag in (("max_examples", "--max-examples"), ("steps", "--steps")):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"{field} ({flag}) must be an integer >= 1, got {value!r}; "
                    f"e.g. {flag} {getattr(RunConfig, field)}."
                )


def check_seed(name: str, run_seed: int | None) -> int:
    """The Hypothesis seed of check `name`: `crc32(name)` when `run_seed` is None (the default,
    derandomized run), else `crc32(name) + k * 2**32` with `k >= 1` a one-to-one function of
    `run_seed`, so every explicit seed (0 included) differs from the default and from each other.

    Example:
        >>> check_seed("check_x", None) != check_seed("check_x", 0)
        True
    """
    base = zlib.crc32(name.encode())
    if run_seed is None:
        return base
    k = 2 * run_seed + 1 if run_seed >= 0 else -2 * run_seed
    return base + k * 2**32


@dataclasses.dataclass
class CheckResult:
    """The outcome of one check; `clause` is the clause a failure violates; a `blocked` check's
    `blocked_by` lists the clauses whose failure it only repeats (`conformance.attribution`)."""

    name: str
    clauses: tuple[str, ...]
    status: str
    clause: str | None = None
    message: str = ""
    counterexample: str = ""
    seconds: float = 0.0
    blocked_by: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Report:
    """Everything the CLI prints and writes as JSON."""

    driver: str
    versions: dict[str, str]
    config: RunConfig
    checks: list[CheckResult]
    clauses: dict[str, dict]
    unmatched: dict[str, list[str]]

    @property
    def failed(self) -> bool:
        return any(c.status == FAIL for c in self.checks)

    def to_json(self) -> dict:
        counts: dict[str, int] = {}
        for entry in self.clauses.values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        return {
            "driver": self.driver,
            "status": "failed" if self.failed else "passed",
            "versions": self.versions,
            "settings": dataclasses.asdict(self.config),
            "summary": counts,
            "clauses": self.clauses,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "unmatched": self.unmatched,
        }


def spec_clauses(path: Path = SPEC_PATH) -> dict[str, str]:
    """`clause ID -> title`, in the spec's order (empty if the spec file is not there)."""
    if not path.is_file():
        return {}
    return dict(_HEADING.findall(path.read_text(encoding="utf-8")))


def read_id_file(path: str | Path) -> tuple[str, ...]:
    """Ids from a skips/xfails file: one per line; `#` starts a comment; blank lines ignored."""
    ids = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            ids.append(entry)
    return tuple(ids)


def _matches(patterns: Iterable[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _settings(config: RunConfig) -> settings:
    return settings(
        max_examples=config.max_examples,
        stateful_step_count=config.steps,
        deadline=None,
        database=None,
        derandomize=False,
        print_blob=False,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=[
            p for p in Phase if p is not Phase.explain and (config.shrink or p is not Phase.shrink)
        ],
    )


def _counterexample(notes: list[str]) -> str:
    """Hypothesis' shrunk example, from the notes it attaches to the failure."""
    lines = []
    for note in notes:
        note = note.removeprefix("Failing test case: ")
        if note != "<state machine>":
            lines.append(note.replace("<lambda>(\n    case=", "case=(\n    "))
    return "\n".join(lines)


def run_check(check: Check, driver, config: RunConfig) -> CheckResult:
    """Run one check under Hypothesis; a failure is the shrunk counterexample."""
    result = CheckResult(check.name, check.covered(driver.capabilities), PASS)
    missing = check.missing(driver.capabilities)
    if missing:
        result.status, result.message = UNSUPPORTED, f"driver lacks capability {missing}"
        return result
    start = time.perf_counter()
    this_seed = check_seed(check.name, config.seed)
    try:
        if check.machine is not None:
            factory = seed(this_seed)(lambda: check.machine(driver))
            run_state_machine_as_test(factory, settings=_settings(config))
        else:
            prop = given(check.cases(driver))(lambda case: check.fn(driver, case))
            for case in check.examples(driver) if check.examples else ():
                prop = example(case)(prop)
            seed(this_seed)(_settings(config)(prop))()
    except hypothesis_errors.Unsatisfiable as e:
        result.status, result.clause, result.message = FAIL, check.clauses[0], f"suite: {e}"
    except Exception as e:  # a ClauseFailure, or the driver crashed where it must not
        while isinstance(e, ExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
        result.status = FAIL
        if isinstance(e, ClauseFailure):
            result.clause, result.message = e.clause_id, e.message
        else:
            result.clause = check.clauses[0]
            result.message = f"the driver raised {type(e).__name__}: {e}"
        result.counterexample = _counterexample(getattr(e, "__notes__", []))
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _apply_expectations(result: CheckResult, check: Check, config: RunConfig) -> None:
    if result.status == FAIL and _matches(config.xfails, check.name, result.clause or ""):
        result.status = XFAIL
    elif result.status == PASS and _matches(config.xfails, check.name, check.clauses[0]):
        result.status = XPASS


def _clause_table(selected: Iterable[str], results: list[CheckResult]) -> dict[str, dict]:
    titles = spec_clauses()
    used = {c for r in results for c in (*r.clauses, r.clause) if c}
    ids = list(titles) + sorted(used - set(titles))
    table = {}
    for cid in ids:
        covering = [r for r in results if cid in r.clauses]
        violated = [r for r in results if r.status in (FAIL, XFAIL) and r.clause == cid]
        blocked = [r for r in results if r.status == BLOCKED and r.clause == cid]
        if cid not in selected and not violated:
            continue
        statuses = {r.status for r in covering}
        if violated:
            status = FAIL if any(r.status == FAIL for r in violated) else XFAIL
            first = violated[0]
            message = first.message + (f"\n{first.counterexample}" if first.counterexample else "")
        elif blocked:
            status, message = BLOCKED, blocked[0].message
        elif statuses & {PASS, XPASS}:
            status, message = PASS, ""
        elif cid in NOT_APPLICABLE:
            status, message = NOT_APPLICABLE_STATUS, NOT_APPLICABLE[cid]
        elif not covering:
            status, message = UNCOVERED, "no check covers this clause"
        elif statuses <= {SKIPPED}:
            status, message = SKIPPED, "skipped by the skips file"
        elif statuses <= {UNSUPPORTED, SKIPPED}:
            status = UNSUPPORTED
            message = next(r.message for r in covering if r.status == UNSUPPORTED)
        else:
            status = BLOCKED
            message = "its checks failed on other clauses: " + ", ".join(
                f"{r.name} ({r.clause})" for r in covering
            )
        table[cid] = {
            "title": titles.get(cid, ""),
            "status": status,
            "message": message,
            "checks": [r.name for r in covering],
        }
    return table


def run_suite(driver, config: RunConfig | None = None, checks: list[Check] | None = None) -> Report:
    """Run every selected check against `driver`; return the report (nothing printed)."""
    config = config or RunConfig()
    checks = CHECKS if checks is None else checks
    patterns = [p.strip() for p in (config.clauses or "*").split(",") if p.strip()]
    chosen = [c for c in checks if _matches(patterns, c.name, *c.clauses)]
    results = []
    for check in chosen:
        if _matches(config.skips, check.name, check.clauses[0]):
            covered = check.covered(driver.capabilities)
            results.append(CheckResult(check.name, covered, SKIPPED, message="skips file"))
            continue
        results.append(run_check(check, driver, config))
    attribute(
        list(zip(chosen, results, strict=True)),
        driver,
        lambda check, view: run_check(check, view, config),
    )
    for check, result in zip(chosen, results, strict=True):
        _apply_expectations(result, check, config)
    known = {c.name for c in checks} | {cid for c in checks for cid in c.clauses}
    unmatched = {
        kind: [p for p in ids if not _matches([p], *known)]
        for kind, ids in (("skips", config.skips), ("xfails", config.xfails))
    }
    selected = {cid for c in chosen for cid in c.clauses if _matches(patterns, cid, c.name)}
    selected |= {cid for cid in spec_clauses() if _matches(patterns, cid)}
    versions_fn = getattr(driver, "versions", None)
    versions = dict(versions_fn()) if callable(versions_fn) else {}
    table = _clause_table(selected, results)
    return Report(driver.name, versions, config, results, table, unmatched)
