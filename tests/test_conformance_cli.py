"""`python -m conformance`: exit codes, table, JSON report, --clauses, skips/xfails files.

Clauses: SW-SUITE-1 (driver loading, the peft skip), SW-SUITE-3 (exit status), SW-SUITE-5
(table and JSON), SW-SUITE-6 (skips/xfails files), SW-SUITE-7 (--max-examples / --steps).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import loader
from conformance.cli import main

BROKEN = str(Path(__file__).with_name("broken_drivers.py"))
ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(["--max-examples", "3", *argv])
    return code, capsys.readouterr()


@pytest.mark.clause("SW-SUITE-5")
def test_clause_filter_table_and_json(tmp_path, capsys):
    """SW-SUITE-5: --clauses restricts the table; --json writes the report."""
    out_file = tmp_path / "report.json"
    code, out = _run(
        capsys, "--driver", "reference", "--clauses", "SW-SCALE-*", "--json", str(out_file)
    )
    assert code == 0
    rows = [line.split()[0] for line in out.out.splitlines() if line.startswith("  SW-")]
    assert rows == ["SW-SCALE-1", "SW-SCALE-2", "SW-SCALE-3"]
    data = json.loads(out_file.read_text())
    assert data["driver"] == "reference" and data["status"] == "passed"
    assert set(data["clauses"]) == {"SW-SCALE-1", "SW-SCALE-2", "SW-SCALE-3"}
    assert data["clauses"]["SW-SCALE-2"]["title"] == "rsLoRA"
    assert data["settings"]["max_examples"] == 3 and data["settings"]["clauses"] == "SW-SCALE-*"
    assert {c["name"] for c in data["checks"]} == {
        "check_default_scale",
        "check_rslora_scale",
        "check_rank_alpha_patterns",
    }
    assert data["summary"] == {"pass": 3}


@pytest.mark.clause("SW-SUITE-3")
def test_failure_exits_1_with_counterexample(tmp_path, capsys):
    """SW-SUITE-3: a failing clause exits 1 and prints the message and the counterexample."""
    out_file = tmp_path / "report.json"
    driver = f"{BROKEN}:UnknownIsBaseDriver"
    code, out = _run(
        capsys, "--driver", driver, "--clauses", "SW-ACTIVE-3", "--json", str(out_file)
    )
    assert code == 1
    assert "FAIL SW-ACTIVE-3" in out.out and "smallest counterexample" in out.out
    data = json.loads(out_file.read_text())
    assert data["status"] == "failed"
    assert data["clauses"]["SW-ACTIVE-3"]["status"] == "fail"
    assert "no error was raised" in data["clauses"]["SW-ACTIVE-3"]["message"]
    failing = [c for c in data["checks"] if c["status"] == "fail"]
    assert failing and all(c["clause"] == "SW-ACTIVE-3" and c["counterexample"] for c in failing)


@pytest.mark.clause("SW-SUITE-6")
def test_xfails_and_skips_files(tmp_path, capsys):
    """SW-SUITE-6: xfailed failures do not fail the run, xpasses are reported, skipped checks do
    not run, and entries that match nothing are warned about."""
    xfails = tmp_path / "xfails.txt"
    xfails.write_text(
        "# known deviations\nSW-ACTIVE-3\n\ncheck_default_scale  # passes\nSW-NOPE-9\n"
    )
    skips = tmp_path / "skips.txt"
    skips.write_text("OperationSequences\n")
    out_file = tmp_path / "r.json"
    driver = f"{BROKEN}:UnknownIsBaseDriver"
    args = ["--driver", driver, "--clauses", "SW-ACTIVE-3,SW-SCALE-1", "--json", str(out_file)]
    code, out = _run(capsys, *args, "--xfails", str(xfails), "--skips", str(skips))
    assert code == 0, out.out
    data = json.loads(out_file.read_text())
    checks = {c["name"]: c["status"] for c in data["checks"]}
    assert checks["OperationSequences"] == "skipped"
    assert checks["check_unknown_name"] == "xfail"
    assert checks["check_default_scale"] == "xpass"
    assert data["clauses"]["SW-ACTIVE-3"]["status"] == "xfail"
    assert data["unmatched"] == {"skips": [], "xfails": ["SW-NOPE-9"]}
    assert "SW-NOPE-9" in out.out and "warning" in out.out


@pytest.mark.clause("SW-SUITE-1")
def test_usage_errors_exit_2(tmp_path, capsys):
    """SW-SUITE-1: an unknown driver or unreadable skips file exits 2 with a message."""
    code, out = _run(capsys, "--driver", "nonexistent")
    assert code == 2 and "unknown driver 'nonexistent'" in out.err
    code, out = _run(capsys, "--driver", "reference", "--skips", str(tmp_path / "none.txt"))
    assert code == 2 and "skips/xfails file" in out.err


@pytest.mark.clause("SW-SUITE-7")
@pytest.mark.parametrize("flag", ["--max-examples", "--steps"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_too_few_examples_or_steps_is_a_usage_error(capsys, flag, value):
    """SW-SUITE-7: --max-examples / --steps below 1 exit 2 with a message naming the flag and
    the value, and nothing is run (no clause is blamed on the driver)."""
    code = main(["--driver", "reference", "--clauses", "SW-SCALE-1", flag, value])
    out = capsys.readouterr()
    assert code == 2
    assert f"{flag}) must be an integer >= 1, got {value}" in out.err
    assert "FAIL" not in out.out and "SW-SCALE-1" not in out.out


@pytest.mark.clause("SW-SUITE-1")
@pytest.mark.parametrize(
    "source, factory, expected",
    [
        ("def broken(:\n", "Driver", "SyntaxError"),
        ("raise RuntimeError('vendor init failed')\n", "Driver", "vendor init failed"),
        ("import no_such_dependency_xyz\n", "Driver", "no_such_dependency_xyz"),
        (
            "def make():\n    raise RuntimeError('no GPU found')\n",
            "make",
            "the driver factory",
        ),
    ],
    ids=["syntax-error", "import-raises", "import-error", "factory-raises"],
)
def test_driver_that_fails_to_load_exits_2(tmp_path, capsys, source, factory, expected):
    """SW-SUITE-1: a driver file with a syntax error, a failing import, or a factory that raises
    is refused with a DriverLoadError (CLI exit 2 and a message), not a traceback."""
    path = tmp_path / "vendor_driver.py"
    path.write_text(source)
    with pytest.raises(loader.DriverLoadError, match=re.escape(expected)):
        loader.load_driver(f"{path}:{factory}")
    code, out = _run(capsys, "--driver", f"{path}:{factory}")
    assert code == 2
    assert out.err.startswith("error: ") and expected in out.err
    assert "Traceback" not in out.out + out.err and "FAIL" not in out.out
    if factory == "make":
        assert "RuntimeError: no GPU found" in out.err and "no arguments" in out.err
    else:
        assert "cannot import driver module" in out.err and str(path) in out.err


@pytest.mark.clause("SW-SUITE-1")
def test_peft_without_dependencies_is_a_clean_skip(tmp_path, capsys, monkeypatch):
    """SW-SUITE-1: when the peft driver cannot be imported, the run is "skipped" with exit 0."""
    monkeypatch.setitem(loader.BUILTIN, "peft", "torch_is_not_installed_here_xyz:PeftDriver")
    out_file = tmp_path / "r.json"
    code, out = _run(capsys, "--driver", "peft", "--json", str(out_file))
    assert code == 0
    assert out.out.startswith("skipped: the 'peft' driver is unavailable")
    assert "Traceback" not in out.out + out.err
    data = json.loads(out_file.read_text())
    assert data["status"] == "skipped" and "torch_is_not_installed_here_xyz" in data["reason"]


@pytest.mark.clause("SW-SUITE-5")
def test_module_entry_point_and_pytest_plugin():
    """SW-SUITE-5: `python -m conformance` and `pytest conformance --driver` both run."""
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "conformance",
            "--driver",
            "reference",
            "--clauses",
            "SW-BANK-1",
            "--max-examples",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "SW-BANK-1" in cli.stdout and "PASS" in cli.stdout
    plugin = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "conformance",
            "-q",
            "-p",
            "no:cacheprovider",
            "--driver",
            f"{BROKEN}:StaleDeleteDriver",
            "--max-examples",
            "4",
            "-k",
            "BANK",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plugin.returncode == 1, plugin.stdout + plugin.stderr
    failed = "FAILED conformance/test_clauses.py::test_clause[SW-BANK-2::check_delete]"
    assert failed in plugin.stdout, plugin.stdout


@pytest.mark.clause("SW-SUITE-8")
def test_markdown_report_keeps_explanations_of_unchanged_rows(tmp_path, capsys):
    """SW-SUITE-8: --markdown writes one row per clause with the run's status; a regenerated
    report keeps an explanation only while its clause's status is unchanged, and keeps the
    `## Appendix` section as it is."""
    md = tmp_path / "report.md"
    driver = f"{BROKEN}:UnknownIsBaseDriver"
    argv = ["--driver", driver, "--clauses", "SW-ACTIVE-*", "--markdown", str(md)]
    code, _ = _run(capsys, *argv)
    assert code == 1
    text = md.read_text()
    assert "--clauses SW-ACTIVE-*" in text and "| SW-ACTIVE-2 | pass |  |  |" in text
    assert re.search(r"\| SW-ACTIVE-3 \| fail \| \w+ \| TODO: explain \|", text)
    appendix = "## Appendix: scripts\n\n```python\nassert True  # | SW-ACTIVE-3 | pass |\n```\n"
    md.write_text(text.replace("TODO: explain", "Unknown names fall back to the base.") + appendix)
    _run(capsys, *argv)
    again = md.read_text()
    assert re.search(r"\| SW-ACTIVE-3 \| fail \| \w+ \| Unknown names fall back", again)
    assert again.endswith("\n" + appendix) and again.count("## Appendix") == 1
    fixed = ["--driver", "reference", "--clauses", "SW-ACTIVE-*", "--markdown", str(md)]
    assert _run(capsys, *fixed)[0] == 0
    assert "| SW-ACTIVE-3 | pass |  |  |" in md.read_text()
