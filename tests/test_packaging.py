"""The package's entry points (SW-PKG-2). The wheel itself is checked by `make check-wheel`
(tools/check_wheel.py): built, installed without extras into a fresh venv, used there."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jaxlora import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.clause("SW-PKG-2", "SW-CLI-4")
def test_python_m_jaxlora_prints_the_help(tmp_path):
    """SW-PKG-2, SW-CLI-4: `python -m jaxlora --help` exits 0 with the commands and where the
    benchmarks are; run from an empty directory, so the package, not the checkout, is used."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-m", "jaxlora", "--help"],
        cwd=tmp_path,
        env=env | {"JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: jaxlora")
    for name in cli.COMMANDS:
        assert name in done.stdout
    assert "python -m benchmarks" in done.stdout


@pytest.mark.clause("SW-PKG-2")
def test_bench_is_not_a_command(capsys):
    """SW-PKG-2: the benchmarks are not a `jaxlora` command (they are not in the wheel):
    `jaxlora bench` is refused as an unknown command, exit status 2."""
    assert "bench" not in cli.COMMANDS
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench"])
    assert exit_.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


@pytest.mark.clause("SW-PKG-2")
def test_the_wheel_is_configured_for_the_library_and_the_suite_only():
    """SW-PKG-2: pyproject.toml lets setuptools find `jaxlora` and `conformance` (and their
    sub-packages) only, and ships `jaxlora/py.typed`, which exists."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    include = config["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["conformance", "conformance.*", "jaxlora", "jaxlora.*"]
    assert config["setuptools"]["package-data"]["jaxlora"] == ["py.typed"]
    assert (ROOT / "jaxlora" / "py.typed").is_file()
