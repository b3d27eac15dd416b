"""Test-wide settings: 8 fake CPU devices (set before JAX starts), Hypothesis profiles.

Profiles (`pytest --hypothesis-profile=NAME`, or HYPOTHESIS_PROFILE=NAME):
- `ci` (default, used by `make test`): few examples, derandomized, no deadline (jit compiles).
- `dev`: fewer examples for quick local loops.
- `thorough`: many examples, random seeds; `make test HYPOTHESIS_PROFILE=thorough`.

XLA compilations are kept in JAX's persistent compilation cache
(`.pytest_cache/jax-compilation`, or `$JAXLORA_TEST_JAX_CACHE`; empty: off), so a program that
several tests (or both pytest-xdist workers) compile is compiled once per run, and a rerun
starts warm. Compile counts in tests are `jax.jit` cache entries (`_cache_size`), which a
persistent-cache hit adds like a compilation, so they are unaffected.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import jax
from hypothesis import HealthCheck, settings

_JAX_CACHE = os.environ.get(
    "JAXLORA_TEST_JAX_CACHE",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"),
)
if _JAX_CACHE:
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=20, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("thorough", max_examples=400, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: The test files that take longest (`--durations` of `make test`), run first: with
#: pytest-xdist a file runs whole on one worker, so a long file started last would keep one
#: worker busy while the other idles. The rest keep their order; a stale name only costs time.
SLOW_FIRST = (
    "test_benchmarks_smoke.py",
    "test_tp.py",
    "test_engine.py",
    "test_engine_hypothesis.py",
    "test_peft_conformance.py",
    "test_conformance_drivers.py",
    "test_cli_llama.py",
    "test_routing.py",
    "test_train_cli.py",
    "test_multiprocess.py",
    "test_serve_compare.py",
    "test_train_slots.py",
    "test_families.py",
    "test_forward.py",
    "test_train_files.py",
    "test_seam.py",
)


def pytest_collection_modifyitems(items):
    """Run `SLOW_FIRST` first, in that order; a stable sort keeps every file's own order."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
