"""`pytest conformance --driver NAME`: the suite as pytest tests, one per registered check.

Options: `--driver` (default "reference"; built-in name, `module:factory` or
`file.py:factory`), `--max-examples N`, `--conformance-seed S`, `--skips FILE`, `--xfails FILE`.
"""

from __future__ import annotations

import pytest

from conformance.loader import DriverUnavailable, load_driver
from conformance.runner import RunConfig, read_id_file


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "LoRA conformance suite")
    group.addoption("--driver", default="reference", help="driver to check (default reference)")
    group.addoption("--max-examples", type=int, default=RunConfig.max_examples)
    group.addoption("--conformance-seed", type=int, default=None)
    group.addoption("--skips", default=None, help="file of check names / clause IDs to skip")
    group.addoption("--xfails", default=None, help="file of check names / clause IDs to xfail")


@pytest.fixture(scope="session")
def driver(request: pytest.FixtureRequest):
    try:
        return load_driver(request.config.getoption("--driver"))
    except DriverUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def run_config(request: pytest.FixtureRequest) -> RunConfig:
    opt = request.config.getoption
    return RunConfig(
        max_examples=opt("--max-examples"),
        seed=opt("--conformance-seed"),
        skips=read_id_file(opt("--skips")) if opt("--skips") else (),
        xfails=read_id_file(opt("--xfails")) if opt("--xfails") else (),
    )
