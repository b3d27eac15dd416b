"""The suite's mutation score: how many mutants of the reference driver the default run kills.

`python -m conformance.mutation` builds each mutant of `conformance.mutants` as a fresh pair of
modules (the mutated file, and the reference driver bound to it; the suite's oracle stays the
unmutated `jaxlora.reference`), runs the registered checks on it in order with the default
profile and stops at the first failure: the mutant is *killed* (by that check and clause), or
*survived* every check. Survivors listed in `EQUIVALENT` (with the reason no conforming-input
observation can tell them apart from the original) are *equivalent*; the score is
killed / (killed + survived - equivalent) (specs/conformance.md, SW-SUITE-11).

    python -m conformance.mutation --json mutation.json      # all mutants, ~5 min on 1 core
    python -m conformance.mutation --only 'jaxlora/reference.py::scale*'

Example:
    >>> from conformance.mutants import mutants
    >>> result = run_mutant(next(m for m in mutants() if m.id.endswith("::scale#4:Div->Mult")))
    >>> result.status
    'killed'
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import signal
import sys
import threading
import time
import types
from collections.abc import Sequence

from .mutants import Mutant, apply, mutants, source
from .registry import CHECKS, Check
from .runner import FAIL, RunConfig, run_check

__all__ = [
    "EQUIVALENT",
    "TARGET_SCORE",
    "MutantResult",
    "build_driver",
    "main",
    "run_mutant",
    "score",
]

_REFERENCE = "jaxlora/reference.py"
_DRIVER = "conformance/drivers/reference.py"

_R, _D = f"{_REFERENCE}::", f"{_DRIVER}::ReferenceDriver."
_UNORDERED = "the order of the paths in a combination's weights is not observable"
#: Mutants that behave like the original on every input the suite may give, with the reason.
EQUIVALENT: dict[str, str] = {
    _R + "RefAdapter.scale_at#0:If-drop": "a combination result has lora_alpha == r, so "
    "alpha / r is its fixed scale 1 too; the suite adds no other adapter with fixed_scale",
    _R + "mixed_forward#2:Raise-drop": "the driver checks the row count before calling it",
    _R + "merge#1:True->False": "copy=False only saves a copy: the merged kernel is a new array "
    "(w + delta) and nothing writes into a kernel in place",
    _R + "merge#11:True->False": "copy=False only saves a copy; nothing writes into a bias",
    _R + "_paths_in_order#0:for-reversed": _UNORDERED,
    _R + "_paths_in_order#1:for-reversed": _UNORDERED,
    _R + "_as_scale_one#0:max->min": "the combination's r and lora_alpha are set equal, so its "
    "scale stays 1 whatever rank is chosen",
    _R + "combine_cat#0:for-reversed": _UNORDERED,
    _R + "combine_cat#1:for-reversed": "the inputs concatenated in reverse order reorder A's "
    "columns and B's rows together: A B is the same sum in another order (SW-TOL-1)",
    _R + "combine_svd#0:for-reversed": _UNORDERED,
    _R + "combine_svd#1:for-reversed": "the weighted sum in reverse order (equal under "
    "SW-TOL-1), and the same largest input rank",
    _R + "combine_svd#17:False->True": "full_matrices=True only adds singular vectors beyond "
    "min(in, out), which [:k] (k <= min(in, out)) never keeps",
    _D + "build#1:Raise-drop": "the suite builds only the dtypes a driver declares "
    "(SW-SUITE-2), so refusing another dtype is never reached",
    _D + "forward#0:If-drop": "while merged, the unmerged model with the active adapters gives "
    "the merged model's output under SW-TOL-1, which is what SW-MERGE-1 asks",
    _D + "forward_mixed#2:Raise-drop": "reference.mixed_forward refuses a row count that "
    "differs from the batch too",
    _D + "combine#1:Raise-drop": "add_adapter refuses the existing name right after, before "
    "anything changes",
    _D + "combine#3:Raise-drop": "the suite asks only for the methods a driver declares; an "
    "unknown one would still raise (KeyError)",
}
#: The share of non-equivalent mutants the default run must kill (SW-SUITE-11).
TARGET_SCORE = 0.95


class _Timeout(BaseException):
    """A mutant ran past its time limit (counted as killed: it hangs)."""


@dataclasses.dataclass
class MutantResult:
    """`status`: "killed", "survived" or "equivalent"; for a killed mutant the check, clause
    and message of the first failure."""

    id: str
    line: int
    status: str
    check: str = ""
    clause: str = ""
    message: str = ""
    seconds: float = 0.0


def _module(name: str, text: str, file: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = file
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    try:
        exec(compile(text, file, "exec"), module.__dict__)
    finally:
        sys.modules.pop(name, None)
    return module


def build_driver(mutant: Mutant | None = None):
    """A `ReferenceDriver` from the (mutated) sources: its `reference` module and `RefAdapter`
    are a private copy of `jaxlora.reference`, so mutating it leaves the suite's oracle alone."""
    texts = {f: source(f) for f in (_REFERENCE, _DRIVER)}
    if mutant is not None:
        texts[mutant.file] = apply(mutant)
    ref = _module("_mutant_jaxlora_reference", texts[_REFERENCE], _REFERENCE)
    drv = _module("_mutant_reference_driver", texts[_DRIVER], _DRIVER)
    drv.reference, drv.RefAdapter = ref, ref.RefAdapter
    return drv.ReferenceDriver()


def _ordered(checks: Sequence[Check]) -> list[Check]:
    """Function checks first, the (slowest) state machine last."""
    return sorted(checks, key=lambda c: c.machine is not None)


def _alarm(seconds: float):
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        return None

    def fire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return previous


def run_mutant(
    mutant: Mutant, config: RunConfig | None = None, timeout: float = 120.0
) -> MutantResult:
    """Run the checks on `mutant` until one fails (default profile unless `config`)."""
    config = dataclasses.replace(config or RunConfig(), shrink=False)
    start = time.perf_counter()
    result = MutantResult(mutant.id, mutant.line, "survived")
    previous = _alarm(timeout)
    try:
        driver = build_driver(mutant)
        for check in _ordered(CHECKS):
            outcome = run_check(check, driver, config)
            if outcome.status == FAIL:
                result.status, result.check = "killed", check.name
                result.clause, result.message = outcome.clause or "", outcome.message
                break
    except _Timeout:
        result.status, result.message = "killed", f"timed out after {timeout:g} s"
    except Exception as e:  # the mutant does not even build
        result.status, result.message = "killed", f"does not build: {type(e).__name__}: {e}"
    finally:
        if previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if result.status == "survived" and mutant.id in EQUIVALENT:
        result.status, result.message = "equivalent", EQUIVALENT[mutant.id]
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def score(results: Sequence[MutantResult]) -> dict:
    """Counts per status and the score killed / non-equivalent."""
    counts = {s: sum(r.status == s for r in results) for s in ("killed", "survived", "equivalent")}
    relevant = counts["killed"] + counts["survived"]
    counts["total"] = len(results)
    counts["score"] = round(counts["killed"] / relevant, 4) if relevant else 1.0
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conformance.mutation",
        description="Mutation score of the conformance suite over the reference driver.",
    )
    p.add_argument("--max-examples", type=int, default=RunConfig.max_examples, metavar="N")
    p.add_argument("--steps", type=int, default=RunConfig.steps, metavar="N")
    p.add_argument("--only", default=None, metavar="GLOBS", help="comma-separated id globs")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per mutant")
    p.add_argument("--json", default=None, metavar="FILE", help="write every result here")
    p.add_argument(
        "--min-score",
        type=float,
        default=TARGET_SCORE,
        metavar="X",
        help="exit 1 below this score (default %(default)s)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the harness; exit status 0, or 1 when the score is below `--min-score`."""
    args = _parser().parse_args(argv)
    chosen = mutants()
    if args.only:
        globs = [g.strip() for g in args.only.split(",") if g.strip()]
        chosen = [m for m in chosen if any(fnmatch.fnmatchcase(m.id, g) for g in globs)]
    if args.list:
        print("\n".join(f"{m.id}  (line {m.line})" for m in chosen))
        return 0
    config = RunConfig(max_examples=args.max_examples, steps=args.steps)
    results = []
    for i, mutant in enumerate(chosen, 1):
        r = run_mutant(mutant, config, args.timeout)
        results.append(r)
        where = f" by {r.check} ({r.clause})" if r.status == "killed" else ""
        print(f"[{i}/{len(chosen)}] {r.status:<10} {r.id}{where}  {r.seconds}s", flush=True)
    summary = score(results)
    print("summary: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    for r in results:
        if r.status == "survived":
            print(f"SURVIVED {r.id} (line {r.line})")
    if args.json:
        data = {"settings": vars(args), "summary": summary, "mutants": [vars(r) for r in results]}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    return 1 if summary["score"] < args.min_score else 0


if __name__ == "__main__":
    sys.exit(main())
