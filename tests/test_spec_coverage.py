"""Spec <-> tests traceability (spec SW-SPEC-1): every clause heading in `specs/*.md` is cited by
a test under `tests/` or by a registered check of the conformance suite (its clauses, and the
clauses its expectations name), and every clause ID cited anywhere (tests, conformance, the
spec text itself) exists."""

from __future__ import annotations

import ast
import collections
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^###\s+(SW-[A-Z][A-Z0-9]*-\d+)\b", re.MULTILINE)
CITATION = re.compile(r"\bSW-[A-Z][A-Z0-9]*-\d+\b")


def spec_files() -> list[pathlib.Path]:
    return sorted((ROOT / "specs").glob("*.md"))


def defined_clauses() -> dict[str, list[str]]:
    """clause ID -> the spec files whose `### ID` headings define it."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for path in spec_files():
        for clause in HEADING.findall(path.read_text(encoding="utf-8")):
            found[clause].append(path.name)
    return found


def citing_files() -> list[pathlib.Path]:
    """The Python files under tests/ and conformance/."""
    files = []
    for folder in ("tests", "conformance"):
        files += [p for p in sorted((ROOT / folder).rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _ids_in(node: ast.AST) -> list[str]:
    """Clause IDs among the string constants of a call's positional arguments."""
    values: list[str] = []
    for arg in getattr(node, "args", []):
        parts = arg.elts if isinstance(arg, ast.Tuple | ast.List) else [arg]
        for part in parts:
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                values += CITATION.findall(part.value)
    return values


def citations(paths: list[pathlib.Path]) -> dict[str, set[str]]:
    """clause ID -> the files that cite it: string arguments of `clause(...)` calls (the pytest
    marker, the conformance registry's decorator) and of `expect*(...)` calls. IDs that only
    appear in prose or test data (e.g. a deliberately unknown ID) are not citations."""
    cited: dict[str, set[str]] = collections.defaultdict(set)
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _call_name(node)
                if name == "clause" or name.startswith("expect"):
                    for clause in _ids_in(node):
                        cited[clause].add(str(path.relative_to(ROOT)))
    return cited


def suite_citations() -> dict[str, set[str]]:
    """clause ID -> the registered conformance checks that verify it (`conformance:<check>`):
    the suite's checks are tests too, run in `make test` against the built-in drivers."""
    from conformance import checks  # noqa: F401  (importing registers every check)
    from conformance.registry import CHECKS

    cited: dict[str, set[str]] = collections.defaultdict(set)
    for check in CHECKS:
        for clause in check.clauses:
            cited[clause].add(f"conformance:{check.name}")
    return cited


def spec_references() -> dict[str, set[str]]:
    """clause ID -> the spec files whose text mentions it."""
    refs: dict[str, set[str]] = collections.defaultdict(set)
    for path in spec_files():
        for clause in CITATION.findall(path.read_text(encoding="utf-8")):
            refs[clause].add(path.name)
    return refs


@pytest.mark.clause("SW-SPEC-1")
def test_every_clause_is_defined_once_and_cited():
    """SW-SPEC-1: each `### SW-...` heading appears once across specs/*.md, and each is cited
    by at least one file under tests/ or conformance/, or verified by a registered check of the
    conformance suite."""
    defined = defined_clauses()
    assert len(defined) >= 30, f"found only {len(defined)} clause headings: the parser is broken"
    twice = {c: files for c, files in defined.items() if len(files) > 1}
    assert not twice, f"clause IDs defined more than once: {twice}"
    cited = citations(citing_files())
    for clause, checks in suite_citations().items():
        cited[clause] |= checks
    uncited = sorted(set(defined) - set(cited))
    assert not uncited, (
        "clauses that no test cites (add a test with @pytest.mark.clause(ID) and the ID in its "
        f"docstring): {', '.join(f'{c} ({defined[c][0]})' for c in uncited)}"
    )


@pytest.mark.clause("SW-SPEC-1")
def test_every_citation_names_an_existing_clause():
    """SW-SPEC-1: an ID cited in tests/ or conformance/, or mentioned in the spec text, that no
    spec heading defines is an error (a typo, or a clause that was renamed)."""
    defined = defined_clauses()
    cited = citations(citing_files())
    for clause, files in [*spec_references().items(), *suite_citations().items()]:
        cited[clause] |= files
    unknown = {c: sorted(files) for c, files in cited.items() if c not in defined}
    assert not unknown, f"citations of clause IDs that no spec defines: {unknown}"


@pytest.mark.clause("SW-SPEC-1")
def test_every_marked_test_names_its_clauses_in_its_docstring():
    """SW-SPEC-1: a test function's `clause` marker IDs also appear in its docstring."""
    missing = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            marked = [
                c
                for d in node.decorator_list
                if isinstance(d, ast.Call) and _call_name(d) == "clause"
                for c in _ids_in(d)
            ]
            doc = ast.get_docstring(node) or ""
            absent = [c for c in marked if c not in doc]
            if absent:
                missing.append(f"{path.name}::{node.name} ({', '.join(absent)})")
    assert not missing, "tests whose docstring lacks their marked clause IDs: " + "; ".join(missing)


@pytest.mark.clause("SW-SPEC-1")
def test_every_suite_check_names_its_clauses_in_its_docstring():
    """SW-SPEC-1: a registered conformance check (function or state machine) names each of
    its clauses in its docstring, as a marked test does; the registry holds the checks (so
    counting them as citations above cannot be vacuous)."""
    from conformance import checks  # noqa: F401  (importing registers every check)
    from conformance.registry import CHECKS

    assert len(CHECKS) >= 30, f"only {len(CHECKS)} registered checks: the registry is broken"
    missing = []
    for check in CHECKS:
        doc = (check.fn or check.machine).__doc__ or ""
        absent = [c for c in check.clauses if c not in doc]
        if absent:
            missing.append(f"{check.name} ({', '.join(absent)})")
    assert not missing, "checks whose docstring lacks their clause IDs: " + "; ".join(missing)
    assert "SW-SCALE-2" in suite_citations()


@pytest.mark.clause("SW-SPEC-1")
def test_the_parsers_see_known_clauses():
    """SW-SPEC-1: the heading parser finds the switching spec's first and last clauses, and the
    citation parser finds this file's own marker (so the checks above can fail)."""
    defined = defined_clauses()
    assert "SW-NOTATION-1" in defined and "SW-ERROR-1" in defined
    assert "SW-SPEC-1" in citations([pathlib.Path(__file__)])
