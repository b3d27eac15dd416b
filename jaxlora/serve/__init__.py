"""Serving many adapters over HTTP: one server, OpenAI-compatible and native routes
(spec `specs/serving.md`).

`jaxlora serve` runs `create_app(OpenAIService(engine, ...))` on a `jaxlora.engine.Engine`
(continuous batching): `/v1/models`, `/v1/completions`, `/v1/chat/completions`, runtime
loading in vLLM's form, the native token-level `POST /generate`, `/health` and Prometheus
`/metrics`, all behind `SecurityMiddleware`. Needs the `serve` extra (`pip install
jaxlora[serve]`: starlette, uvicorn, prometheus_client, tokenizers, jinja2) for
`OpenAIService`, `create_app` and `ServerThread`; the routing hooks need nothing.

Example:
    >>> from jaxlora.serve import RoutingHooks, parse_split
    >>> hooks = RoutingHooks(splits=[parse_split("t=a:0.5,b:0.5")])
    >>> hooks.plan({"adapter": "t"}, header=None, request_id="r1").route["split"]["task"]
    't'
"""

from .errors import QueueFullError as QueueFullError
from .errors import RequestTimeoutError as RequestTimeoutError
from .errors import RequestTooLargeError as RequestTooLargeError
from .hooks import RoutingHooks as RoutingHooks
from .hooks import Split as Split
from .hooks import parse_fallback as parse_fallback
from .hooks import parse_split as parse_split
from .registry import BASE as BASE
from .registry import Registry as Registry
from .security import Policy as Policy


def __getattr__(name: str):
    """`OpenAIService`, `create_app` and `ServerThread` import starlette / uvicorn only when
    used."""
    if name in ("OpenAIService", "create_app"):
        from . import openai

        return getattr(openai, name)
    if name == "ServerThread":
        from .runner import ServerThread

        return ServerThread
    raise AttributeError(f"module 'jaxlora.serve' has no attribute {name!r}")
