"""The clause checks, one module per group of spec sections; importing registers them all.

Example:
    >>> from conformance import checks
    >>> from conformance.registry import CHECKS
    >>> any("SW-SCALE-1" in c.clauses for c in CHECKS)
    True
"""

from .. import stateful as stateful
from . import batch_merge as batch_merge
from . import numerics as numerics
from . import state as state
