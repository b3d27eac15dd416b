"""The HTTP API of `jaxlora serve` (spec `specs/serving.md`).

Starlette on uvicorn: Starlette is a small ASGI toolkit (no pydantic, no code generation), which
is all a JSON API of six routes needs, and its `Request.receive()` tells us when a client
disconnects, so a request still waiting in the queue is dropped. FastAPI would add pydantic
models and an OpenAPI layer we do not use.

Routes: `POST /generate`, `GET /adapters`, `POST /adapters/{name}` (body `{"path": DIR}`: a PEFT
adapter directory loaded into the engine's host store, no recompilation; it reaches a device
slot when a request needs it), `DELETE /adapters/{name}`,
`GET /health`, `GET /metrics`. Errors are JSON `{"error": message}` with 400 (malformed JSON,
bad fields, token ids outside the vocabulary), 404 (unknown adapter, with `adapters`: the list),
409 (name taken, store full), 413 (too long), 503 (queue full), 504 (timed out).

`POST /adapters/{name}` reads a directory on the server's machine: bind to 127.0.0.1 (the
default) or give `adapter_root`, under which every path must lie.

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora.serve import Engine, Buckets, Service, create_app
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)), capacity=1, rank=2,
    ...                 buckets=Buckets((1, 4), (8,), 4))
    >>> app = create_app(Service(engine))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, JaxLoraError
from ..io import load_peft_adapter
from .engine import BASE, Engine, Row
from .errors import RequestTimeoutError, RequestTooLargeError
from .hooks import RoutingHooks, Split
from .metrics import Metrics
from .scheduler import Scheduler, Served

__all__ = ["Service", "create_app"]

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never seen by the client
SEED_LIMIT = 2**32  # seeds feed a uint32 PRNG key

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Service:
    """Everything a server holds: engine, scheduler, hooks, limits.

    Arguments:
        engine: the model, its engine and adapter store (`jaxlora.serve.engine`).
        hooks: classifier, A/B splits, fallback chains.
        window_s: unused (continuous batching); max_pending: the most requests waiting.
        timeout_s: the default per-request timeout (a request may ask for less).
        max_body_bytes: larger request bodies are refused with 413.
        default_max_new_tokens: used when a request gives no `max_new_tokens`.
        tokenizer: optional object with `encode(text) -> list[int]` and `decode(ids) -> str`.
        adapter_root: when set, `POST /adapters/{name}` only reads directories under it.
    """

    engine: Engine
    hooks: RoutingHooks = dataclasses.field(default_factory=RoutingHooks)
    window_s: float = 0.005
    max_pending: int = 256
    timeout_s: float = 60.0
    max_body_bytes: int = 1 << 20
    default_max_new_tokens: int = 16
    tokenizer: Any = None
    adapter_root: Path | None = None
    metrics: Metrics = dataclasses.field(default_factory=Metrics)

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < float("inf"):
            raise ConfigError(
                f"Service: timeout_s must be a finite number of seconds > 0, got "
                f"{self.timeout_s!r}; e.g. 60."
            )
        self.scheduler = Scheduler(
            self.engine, window_s=self.window_s, max_pending=self.max_pending, metrics=self.metrics
        )

    def load_dir(self, name: str, path: str | Path) -> int:
        """Load the PEFT adapter directory `path` as `name`; returns its version."""
        directory = Path(path).resolve()
        if self.adapter_root is not None:
            root = Path(self.adapter_root).resolve()
            if not directory.is_relative_to(root):
                raise ConfigError(
                    f"{directory} is outside the adapter root {root}; put the adapter under it."
                )
        adapter, _ = load_peft_adapter(
            directory, layer_shapes=self.engine.model.lora_shapes(), name=name
        )
        return self.engine.load(name, adapter, source=str(directory))


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message} | extra, status_code=status)


def _status(err: Exception) -> int:
    if isinstance(err, AdapterNotFoundError):
        return 404
    if isinstance(err, AdapterExistsError):
        return 409
    return getattr(err, "status", 400)


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; a body over `limit` bytes is drained (not kept) and refused."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise RequestTooLargeError(f"the body is {size} bytes, above the limit of {limit}.")
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"the body is not valid JSON ({err}).") from None
    if not isinstance(body, dict):
        raise ConfigError(f"the body must be a JSON object, got {type(body).__name__}.")
    return body


def _int(body, key, default, minimum=0, limit=None):
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"`{key}` must be an int >= {minimum}, got {value!r}.")
    if limit is not None and value >= limit:
        raise ConfigError(f"`{key}` must be an int in [{minimum}, {limit}), got {value!r}.")
    return value


def _number(body, key, default, minimum=0.0):
    value = body.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not value >= minimum or value == float("inf"):
        raise ConfigError(f"`{key}` must be a finite number >= {minimum}, got {value!r}.")
    return float(value)


def _ids(body, key, tokenizer=None) -> tuple[int, ...]:
    value = body.get(key)
    if key == "tokens" and value is None and "text" in body:
        if tokenizer is None:
            raise ConfigError("this server has no tokenizer: send `tokens` (token ids).")
        if not isinstance(body["text"], str):
            raise ConfigError("`text` must be a string.")
        return tuple(tokenizer.encode(body["text"]))
    if value is None and key == "stop":
        return ()
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise ConfigError(f"`{key}` must be a list of token ids (ints), got {value!r}.")
    return tuple(value)


def _row(service: Service, body: dict[str, Any], request_id: str) -> Row:
    limit = service.engine.buckets.max_new_tokens
    return Row(
        tokens=_ids(body, "tokens", service.tokenizer),
        adapter=None,
        max_new_tokens=_int(body, "max_new_tokens", min(service.default_max_new_tokens, limit), 1),
        temperature=_number(body, "temperature", 0.0),
        top_k=_int(body, "top_k", 0),
        top_p=_number(body, "top_p", 1.0),
        seed=_int(
            body,
            "seed",
            int(uuid.uuid5(uuid.NAMESPACE_OID, request_id)) % SEED_LIMIT,
            limit=SEED_LIMIT,
        ),
        stop=_ids(body, "stop"),
    )


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(service: Service, row: Row, request: Request, timeout_s: float) -> Served | None:
    """The request's result; None if the client went away (the request is then dropped)."""
    pending = service.scheduler.submit(row, timeout_s)
    result = asyncio.wrap_future(pending.future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {result, gone}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
    finally:
        gone.cancel()
    if result in done:
        return result.result()
    service.scheduler.cancel(pending)
    if gone in done:
        service.metrics.count("client_disconnected")
        return None
    service.metrics.count("timed_out")
    raise RequestTimeoutError(f"no result within the request's timeout of {timeout_s} s.")


async def _generate(service: Service, request: Request) -> Response:
    body = await _json_body(request, service.max_body_bytes)
    request_id = body.get("id") or uuid.uuid4().hex
    if not isinstance(request_id, str):
        raise ConfigError(f"`id` must be a string, got {request_id!r}.")
    row = _row(service, body, request_id)
    timeout_s = min(_number(body, "timeout", service.timeout_s, 1e-6), service.timeout_s)
    plan = service.hooks.plan(body, request.headers.get("x-task-type"), request_id)
    loaded = service.engine.adapters()
    unknown = [a for a in plan.chain if a is not None and a not in loaded]
    if unknown:
        raise AdapterNotFoundError(f"unknown adapter {unknown[0]!r}; load it or use one of these.")
    attempts = []
    served, adapter = None, None
    deadline = time.monotonic() + timeout_s  # one budget for all fallback attempts together
    for i, adapter in enumerate(plan.chain):
        candidate = dataclasses.replace(row, adapter=adapter)
        service.engine.check(candidate)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            service.metrics.count("timed_out")
            raise RequestTimeoutError(
                f"no result within the request's timeout of {timeout_s} s ({i} of "
                f"{len(plan.chain)} fallback attempts done); retry with a larger `timeout`."
            )
        served = await _wait(service, candidate, request, remaining)
        if served is None:
            return Response(status_code=CLIENT_CLOSED)
        if len(plan.chain) > 1:
            confidence = float(service.hooks.confidence(body, served.result))
            accepted = confidence >= service.hooks.min_confidence or i == len(plan.chain) - 1
            attempts.append({"adapter": adapter, "confidence": confidence, "accepted": accepted})
            if not accepted:
                continue
        break
    assert served is not None  # the chain has at least one adapter (RoutingHooks.plan)
    result, batch = served.result, served.batch
    out = {
        "id": request_id,
        "adapter": adapter,
        "tokens": result.tokens,
        "logprobs": result.logprobs,
        "finish_reason": result.finish_reason,
        "route": plan.route | ({"attempts": attempts} if attempts else {}),
        "batch": dataclasses.asdict(batch) | {"adapters": list(batch.adapters)},
        "queue_ms": served.queue_s * 1e3,
    }
    if service.tokenizer is not None:
        out["text"] = service.tokenizer.decode(result.tokens)
    return JSONResponse(out)


def create_app(service: Service) -> Starlette:
    """The Starlette app; its lifespan starts and stops the scheduler thread."""

    async def generate(request: Request) -> Response:
        status = CLIENT_CLOSED  # kept only if the handler is cancelled (no response sent)
        try:
            try:
                response = await _generate(service, request)
            except JaxLoraError as err:
                extra = {}
                if isinstance(err, AdapterNotFoundError):
                    extra["adapters"] = [BASE, *sorted(service.engine.adapters())]
                    extra["tasks"] = sorted({*_splits(service), *_fallbacks(service)})
                response = _error(_status(err), str(err), **extra)
            except Exception as err:  # a classifier, confidence function or tokenizer failed
                _log.exception("POST /generate failed")
                response = _error(
                    500, f"internal error: {type(err).__name__}: {err}", type=type(err).__name__
                )
            status = response.status_code
            return response
        finally:
            service.metrics.record_status(status)

    async def list_adapters(request: Request) -> Response:
        engine = service.engine
        loaded = engine.adapters()
        return JSONResponse(
            {
                "adapters": [{"name": n} | info for n, info in sorted(loaded.items())],
                "capacity": engine.capacity,
                "free_slots": engine.capacity - sum(a["slot"] is not None for a in loaded.values()),
                "rank": engine.rank,
                "splits": {t: dict(s.arms) for t, s in _splits(service).items()},
                "fallbacks": {t: list(c) for t, c in _fallbacks(service).items()},
            }
        )

    async def load_adapter(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            body = await _json_body(request, service.max_body_bytes)
            if not isinstance(body.get("path"), str):
                raise ConfigError('the body must be {"path": "<PEFT adapter directory>"}.')
            version = await asyncio.to_thread(service.load_dir, name, body["path"])
        except JaxLoraError as err:
            return _error(_status(err), str(err))
        return JSONResponse({"name": name, "version": version}, status_code=201)

    async def unload_adapter(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            version = service.engine.unload(name)
        except AdapterNotFoundError as err:
            return _error(404, str(err), adapters=sorted(service.engine.adapters()))
        return JSONResponse({"name": name, "version": version})

    async def health(request: Request) -> Response:
        engine = service.engine
        return JSONResponse(
            {
                "status": "ok",
                "pending": service.scheduler.pending(),
                "adapters": len(engine.adapters()),
                "capacity": engine.capacity,
            }
        )

    async def metrics(request: Request) -> Response:
        return JSONResponse(
            service.metrics.snapshot(
                compile_count=service.engine.compile_count(),
                pending=service.scheduler.pending(),
                time=time.time(),
            )
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.scheduler.stop)

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/adapters", list_adapters, methods=["GET"]),
        Route("/adapters/{name}", load_adapter, methods=["POST"]),
        Route("/adapters/{name}", unload_adapter, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def _splits(service: Any) -> Mapping[str, Split]:
    """`task -> Split` (RoutingHooks stores its splits keyed by task after construction)."""
    return cast(Mapping[str, Split], service.hooks.splits)


def _fallbacks(service: Any) -> Mapping[str, tuple[str, ...]]:
    """`task -> fallback chain` (keyed by task after RoutingHooks' construction)."""
    return cast(Mapping[str, tuple[str, ...]], service.hooks.fallbacks)
