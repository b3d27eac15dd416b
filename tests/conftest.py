"""Test-wide settings: 8 fake CPU devices (set before JAX starts), Hypothesis profiles.

Profiles (`pytest --hypothesis-profile=NAME`, or HYPOTHESIS_PROFILE=NAME):
- `ci` (default, used by `make test`): few examples, derandomized, no deadline (jit compiles).
- `dev`: fewer examples for quick local loops.
- `thorough`: many examples, random seeds; `make test HYPOTHESIS_PROFILE=thorough`.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from hypothesis import HealthCheck, settings

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=20, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, **_common)
settings.register_profile("thorough", max_examples=400, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
