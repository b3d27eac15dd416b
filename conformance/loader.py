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

from .driver import CAPABILITIES, Driver

__all__ = ["BUILTIN", "DriverLoadError", "DriverUnavailable", "driver_problems", "load_driver"]

#: Members every driver has; the rest of the protocol is needed only per capability.
CORE_MEMBERS = (
    "name",
    "capabilities",
    "build",
    "add_adapter",
    "delete_adapter",
    "set_active",
    "forward",
)
#: capability (or "combine") -> the methods it needs.
CAPABILITY_METHODS = {
    "mixed": ("forward_mixed",),
    "merge": ("merge", "unmerge", "base_kernels"),
    "safe_merge": ("merge",),
    "combine": ("combine",),
    "target_selection": ("select_targets",),
    "compile_count": ("compile_count",),
}

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
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
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
    except DriverLoadError:
        raise
    except Exception as e:  # SyntaxError, or any error raised while the module body runs
        raise DriverLoadError(
            f"cannot import driver module {module_name!r}: {type(e).__name__}: {e}; fix the "
            "driver module so that it imports cleanly."
        ) from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise DriverLoadError(
            f"module {module_name!r} has no callable {factory_name!r}; the factory must be a "
            "class or function that returns the driver."
        )
    try:
        driver = factory()
    except Exception as e:  # the third-party factory crashed: a loading problem, not a check
        raise DriverLoadError(
            f"the driver factory {target!r} raised {type(e).__name__}: {e}; it must return a "
            "driver when called with no arguments."
        ) from e
    problems = driver_problems(driver)
    if problems:
        raise DriverLoadError(
            f"{target!r} returned a {type(driver).__name__} that does not implement the Driver "
            f"protocol: {'; '.join(problems)} (see conformance/README.md)."
        )
    return driver


def driver_problems(driver) -> list[str]:
    """What `driver` lacks: core members, and the methods its declared capabilities need.

    Example:
        >>> driver_problems(object())[0][:40]
        "missing members ['add_adapter', 'build',"
    """
    problems = []
    missing = sorted(m for m in CORE_MEMBERS if not hasattr(driver, m))
    if missing:
        problems.append(f"missing members {missing}")
    capabilities = set(getattr(driver, "capabilities", ()) or ())
    unknown = sorted(capabilities - CAPABILITIES)
    if unknown:
        problems.append(f"unknown capabilities {unknown}; known: {sorted(CAPABILITIES)}")
    for capability in sorted(capabilities):
        prefix = capability.split("_")[0] if capability.startswith("combine") else capability
        for method in CAPABILITY_METHODS.get(prefix, ()):
            if not callable(getattr(driver, method, None)):
                problems.append(f"declares {capability!r} but has no method {method!r}")
    return problems
