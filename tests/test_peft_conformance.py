"""The conformance suite run against PEFT reproduces the committed deviation report
`specs/peft-deviations.md` (spec SW-IO-11)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
from conformance.drivers.peft_driver import PeftDriver
from conformance.runner import RunConfig

REPORT = Path(__file__).resolve().parent.parent / "specs" / "peft-deviations.md"
_ROW = re.compile(r"^\| (SW-[A-Z]+-\d+) \| ([a-z ]+?) \|", re.MULTILINE)
_SETTINGS = re.compile(r"--max-examples (\d+) --steps (\d+)")
_VERSIONS = re.compile(r"Versions: peft (\S+), torch (\S+) ")


def committed_report() -> tuple[dict[str, str], RunConfig, dict[str, str]]:
    text = REPORT.read_text(encoding="utf-8")
    examples, steps = map(int, _SETTINGS.search(text).groups())
    peft_version, torch_version = _VERSIONS.search(text).groups()
    statuses = dict(_ROW.findall(text))
    return (
        statuses,
        RunConfig(max_examples=examples, steps=steps),
        {
            "peft": peft_version.rstrip(","),
            "torch": torch_version,
        },
    )


@pytest.mark.clause("SW-IO-11")
def test_peft_run_matches_committed_deviation_report(tmp_path):
    """SW-IO-11: `python -m conformance --driver peft` (a fresh process, as a user runs it, so no
    state from other tests leaks in) gives every clause the status in specs/peft-deviations.md."""
    statuses, config, versions = committed_report()
    driver = PeftDriver()
    if driver.versions() != versions:
        pytest.skip(
            f"specs/peft-deviations.md was generated with {versions}, installed: "
            f"{driver.versions()}; regenerate it (see the command in the file)."
        )
    out = tmp_path / "peft.json"
    argv = ["--driver", "peft", "--max-examples", str(config.max_examples)]
    argv += ["--steps", str(config.steps), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "conformance", *argv],
        cwd=REPORT.parent.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]  # PEFT deviates
    got = {cid: entry["status"] for cid, entry in json.loads(out.read_text())["clauses"].items()}
    assert set(statuses) == set(got), f"clauses differ: {sorted(set(statuses) ^ set(got))}"
    changed = {c: (statuses[c], got[c]) for c in got if statuses[c] != got[c]}
    assert not changed, f"(report, this run) differ: {changed}; regenerate the report"
    assert "fail" in statuses.values()  # the known deviations are still reported
