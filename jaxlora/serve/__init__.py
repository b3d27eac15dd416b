"""Serving many adapters over HTTP with dynamic mixed batching (spec `specs/serving.md`).

Needs the `serve` extra (`pip install jaxlora[serve]`: starlette, uvicorn) for `create_app`
and `ServerThread`; `Engine` and `Scheduler` need only JAX.

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora.serve import Buckets, Engine
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)), capacity=2, rank=2,
    ...                 buckets=Buckets((1, 4), (8,), 4))
    >>> engine.capacity
    2
"""

from .engine import BASE as BASE
from .engine import Buckets as Buckets
from .engine import Engine as Engine
from .engine import Row as Row
from .engine import RowResult as RowResult
from .errors import NoFreeSlotError as NoFreeSlotError
from .errors import QueueFullError as QueueFullError
from .errors import RequestTimeoutError as RequestTimeoutError
from .errors import RequestTooLargeError as RequestTooLargeError
from .hooks import RoutingHooks as RoutingHooks
from .hooks import Split as Split
from .hooks import parse_fallback as parse_fallback
from .hooks import parse_split as parse_split
from .metrics import Metrics as Metrics
from .scheduler import Scheduler as Scheduler


def __getattr__(name: str):
    """`create_app`, `Service` and `ServerThread` import starlette/uvicorn only when used."""
    if name in ("create_app", "Service"):
        from . import app

        return getattr(app, name)
    if name == "ServerThread":
        from .runner import ServerThread

        return ServerThread
    raise AttributeError(f"module 'jaxlora.serve' has no attribute {name!r}")
