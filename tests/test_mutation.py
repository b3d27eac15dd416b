"""The suite's mutation score (SW-SUITE-11): a fixed sample of mutants of the reference driver,
one per operator family, is killed by the default profile; a known equivalent one survives and
is reported as such. The full campaign (`python -m conformance.mutation`) is in
conformance/README.md."""

from __future__ import annotations

import dataclasses

import pytest

from conformance import mutation
from conformance.mutants import TARGETS, Mutant, apply, mutants
from conformance.runner import run_suite

#: (file, function, operator) -> one mutant each; chosen by function and operator rather than
#: by index, so that an edit elsewhere in the function does not change the sample.
SAMPLE = [
    ("jaxlora/reference.py", "scale", "Div->Mult"),  # alpha * r
    ("jaxlora/reference.py", "resolve", "for-reversed"),  # last matching key wins
    ("jaxlora/reference.py", "resolve", "regex-\\.->."),  # (.*.)? : a key ends inside a segment
    ("jaxlora/reference.py", "targets", "fullmatch->match"),  # a prefix is enough
    ("jaxlora/reference.py", "targets", "Add-drop-right"),  # endswith(name), no dot
    ("jaxlora/reference.py", "chain_forward", "const+1"),  # no tanh before the last layer
    ("conformance/drivers/reference.py", "normalize_active", "Raise-drop"),  # duplicates pass
]


def _pick(file: str, function: str, op: str) -> Mutant:
    return next(m for m in mutants() if (m.file, m.function, m.op) == (file, function, op))


@pytest.mark.clause("SW-SUITE-11")
@pytest.mark.parametrize("file, function, op", SAMPLE, ids=[f"{f}:{o}" for _, f, o in SAMPLE])
def test_sampled_mutant_is_killed(file, function, op):
    """SW-SUITE-11: each sampled mutant (one per operator family, including the matching rules
    that only the adversarial world reaches) fails a check of the default profile, which names
    a clause."""
    result = mutation.run_mutant(_pick(file, function, op))
    assert result.status == "killed", result
    assert result.clause.startswith("SW-") and result.check, result


@pytest.mark.clause("SW-SUITE-11")
def test_equivalent_mutant_survives_and_is_reported_equivalent():
    """SW-SUITE-11: a mutant listed in EQUIVALENT (`full_matrices=True` in the SVD) passes every
    check and is reported `equivalent`, not `survived`; the unmutated build passes the suite."""
    mutant = _pick("jaxlora/reference.py", "combine_svd", "False->True")
    assert mutant.id in mutation.EQUIVALENT
    assert mutation.run_mutant(mutant).status == "equivalent"
    assert not run_suite(mutation.build_driver()).failed


@pytest.mark.clause("SW-SUITE-11")
def test_mutants_cover_both_files_and_every_operator_family():
    """SW-SUITE-11: the AST mutator derives mutants in both files of the reference driver, of
    every operator family, with unique ids; every EQUIVALENT id names a current mutant (so the
    list is updated when the sources change); `apply` refuses a mutant that no longer applies."""
    found = mutants()
    ids = [m.id for m in found]
    assert len(ids) == len(set(ids)) and 100 <= len(ids) <= 250
    assert {m.file for m in found} == set(TARGETS)
    ops = {m.op for m in found}
    for family in ("Add->Sub", "Lt->LtE", "And->Or", "const+1", "regex-drop-$", "str->empty"):
        assert family in ops, family
    assert {"fullmatch->match", "sqrt-drop", "for-reversed", "Raise-drop", "Expr-drop"} <= ops
    assert set(mutation.EQUIVALENT) <= set(ids), set(mutation.EQUIVALENT) - set(ids)
    stale = dataclasses.replace(found[0], op="Mult->Div")
    with pytest.raises(ValueError, match="does not apply"):
        apply(stale)


@pytest.mark.clause("SW-SUITE-11")
def test_score_counts_equivalents_apart():
    """SW-SUITE-11: the score is killed / (killed + survived); equivalents are not counted."""
    results = [
        mutation.MutantResult("a", 1, "killed"),
        mutation.MutantResult("b", 1, "killed"),
        mutation.MutantResult("c", 1, "survived"),
        mutation.MutantResult("d", 1, "equivalent"),
    ]
    summary = mutation.score(results)
    assert summary["score"] == round(2 / 3, 4) and summary["total"] == 4
    assert summary["equivalent"] == 1 and mutation.TARGET_SCORE == 0.95
