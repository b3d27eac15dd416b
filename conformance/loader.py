"""Find a driver by name: a built-in one, `module:factory`, or `path/to/file.py:factory`.

Example:
    >>> load_driver("reference").name
    'reference'
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .driver import Driver

__all__ = ["BUILTIN", "DriverLoadError", "DriverUnavailable", "load_driver"]

#: Built-in driver names -> `module:factory`.
BUILTIN = {
    "reference": "conformance.drivers.reference:ReferenceDriver",
    "jaxlora": "conformance.drivers.jaxlora_driver:JaxLoraDriver",
    "peft": "conformance.drivers.peft_driver:PeftDriver",
}
#: Built-in drivers whose third-party dependencies may be missing: a skip, not an error.
_OPTIONAL = {"peft"}


class DriverLoadError(Exception):
    """The driver spec cannot be resolved to a driver (bad name, module, factory or object)."""


class DriverUnavailable(Exception):
    """An optional built-in driver's dependencies are not installed (the run is skipped)."""


def _import_file(path: Path):
    name = f"_conformance_driver_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise DriverLoadError(f"cannot import {str(path)!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_driver(spec: str) -> Driver:
    """A driver instance for `spec`.

    Arguments:
        spec: `"reference"`, `"jaxlora"`, `"peft"`, `"package.module:factory"` or
            `"path/to/file.py:factory"`; `factory` is a class or function called with no
            arguments that returns an object implementing `conformance.driver.Driver`.

    Raises:
        DriverUnavailable: an optional built-in driver (`peft`) lacks its dependencies.
        DriverLoadError: anything else that prevents loading, with what to fix.
    """
    target = BUILTIN.get(spec, spec)
    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise DriverLoadError(
            f"unknown driver {spec!r}: use one of {sorted(BUILTIN)} or 'module:factory' / "
            "'path/to/file.py:factory' (e.g. 'my_lora.conformance:MyDriver')."
        )
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise DriverLoadError(f"driver file {module_name!r} does not exist.")
            module = _import_file(path)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        if spec in _OPTIONAL:
            raise DriverUnavailable(f"the {spec!r} driver is unavailable: {e}") from e
        raise DriverLoadError(f"cannot import driver module {module_name!r}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise DriverLoadError(
            f"module {module_name!r} has no callable {factory_name!r}; the factory must be a "
            "class or function that returns the driver."
        )
    driver = factory()
    if not isinstance(driver, Driver):
        members = ("name", "capabilities", *(m for m in vars(Driver) if not m.startswith("_")))
        missing = {m for m in members if not hasattr(driver, m)}
        raise DriverLoadError(
            f"{target!r} returned {type(driver).__name__}, which lacks the Driver members "
            f"{sorted(missing)} (see conformance/README.md)."
        )
    return driver
