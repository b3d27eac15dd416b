"""OpenAI-compatible routes over the engine (spec SW-OAI-*), as vLLM serves them.

`GET /v1/models` (the base model and every adapter, `parent` = the base model's name, as
vLLM lists them), `GET /v1/models/{id}`, `POST /v1/completions`, `POST /v1/chat/completions`
(the model directory's chat template), `model` = an adapter's name, a task of the routing
hooks (A/B split, fallback chain) or the base model's name; streaming as server-sent events in
OpenAI's chunk format ending with `data: [DONE]`; `usage` in every answer (and in a last chunk
with `stream_options.include_usage`). Runtime loading in vLLM's form (`POST
/v1/load_lora_adapter {"lora_name", "lora_path"}`, `POST /v1/unload_lora_adapter
{"lora_name"}`) when `runtime_loading` is on (admin endpoints, see `jaxlora.serve.security`).
Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; the `openai`
client raises its matching exception types. `GET /metrics` is Prometheus' text format.

Every answer names the adapter version that produced it (its content hash): the
`X-Adapter-Version` header, `system_fingerprint`, and `adapter` / `adapter_version` of each
choice; it shows no other adapter and, except to admins, no file path.

The same app serves the native token-level `POST /generate` (`jaxlora.serve.native`) on the
same registry, hooks, limits and metrics, and `GET /health`. Every error, on every route, has
OpenAI's shape.

Example:
    >>> from jaxlora.engine import Engine, EngineConfig
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)),
    ...                 EngineConfig(rows=2, max_len=16, chunks=(8,), slots=1, rank=2))
    >>> app = create_app(OpenAIService(engine, model_name="tiny", adapter_root="."))
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import AdapterExistsError, AdapterNotFoundError, JaxLoraError
from .errors import CLIENT_CLOSED, BadRequestError
from .limits import Fields, parse_json, read_body
from .metrics import CONTENT_TYPE
from .native import ENDPOINT as NATIVE_ENDPOINT
from .native import generate_answer, race
from .openai_answers import OpenAIService, Run
from .openai_params import parse_chat, parse_completion
from .registry import BASE
from .security import SecurityMiddleware, error_body, is_admin

__all__ = ["CLIENT_CLOSED", "OpenAIService", "create_app", "error_response"]

_log = logging.getLogger(__name__)


_KINDS = {404: "not_found_error", 409: "conflict_error", 503: "server_busy", 500: "server_error"}


def error_response(path: str, err: Exception) -> JSONResponse:
    """The JSON error answer for `err` (OpenAI's shape; `path` names the field at fault)."""
    if isinstance(err, AdapterNotFoundError):
        status, param = 404, "adapter" if path == NATIVE_ENDPOINT else "model"
    elif isinstance(err, AdapterExistsError):
        status, param = 409, "lora_name"
    else:
        status, param = getattr(err, "status", 400), getattr(err, "param", None)
    kind = getattr(err, "kind", None) or _KINDS.get(status, "invalid_request_error")
    return JSONResponse(error_body(status, str(err), kind, param), status_code=status)


async def _body(service: OpenAIService, request: Request) -> Any:
    return parse_json(await read_body(request.stream(), service.max_body_bytes))


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _routes(service: OpenAIService) -> list[Route]:
    s = service

    def model_card(request: Request, name: str | None) -> dict:
        admin = is_admin(request)
        if name is None:
            root = s.model_source if admin else None
            return {
                "id": s.model_name,
                "object": "model",
                "created": s.created,
                "owned_by": "jaxlora",
                "root": root,
                "parent": None,
                "max_model_len": s.limits.max_len,
                "permission": [],
            }
        info = s.registry.get(name)
        if info is None:
            raise AdapterNotFoundError(f"the model `{name}` does not exist.")
        return {
            "id": name,
            "object": "model",
            "created": s.created,
            "owned_by": "jaxlora",
            "root": info.source if admin else None,
            "parent": s.model_name,
            "max_model_len": s.limits.max_len,
            "version": info.version,
        }

    async def list_models(request: Request) -> Response:
        cards = [model_card(request, None)] + [
            model_card(request, i.name) for i in s.registry.infos()
        ]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        return JSONResponse(model_card(request, None if name == s.model_name else name))

    async def generate(request: Request, parse: Callable) -> Response:
        job = parse(await _body(s, request), s.limits, s.text)
        run = Run(s, job, request.url.path)
        if job.stream:
            run.start()
            version = run.live[0].version if run.live else _first_version(s, run.chain)
            return StreamingResponse(
                run.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Adapter-Version": version},
            )
        done, body = await race(run.answer(), _until_disconnect(request), None)
        if not done:  # the client went away: its rows are cancelled, nobody is answered
            return Response(status_code=CLIENT_CLOSED)
        version = body["choices"][0]["adapter_version"]
        return JSONResponse(body, headers={"X-Adapter-Version": version})

    async def native(request: Request) -> Response:
        body = await _body(s, request)
        header = request.headers.get("x-task-type")
        answer = await generate_answer(s, body, header, lambda: _until_disconnect(request))
        if answer is None:
            return Response(status_code=CLIENT_CLOSED)
        out, version = answer
        return JSONResponse(out, headers={"X-Adapter-Version": version})

    async def completions(request: Request) -> Response:
        return await generate(request, parse_completion)

    async def chat(request: Request) -> Response:
        return await generate(request, parse_chat)

    def loading_on() -> None:
        if not s.runtime_loading:
            raise AdapterNotFoundError(
                "runtime adapter loading is off; start the server with --enable-runtime-lora."
            )

    async def load(request: Request) -> Response:
        loading_on()
        f = Fields(await _body(s, request))
        name, path = f.str("lora_name", required=True), f.raw("lora_path")
        replace = f.bool("load_inplace", False)
        f.neutral("base_model_name", s.model_name)
        f.finish()
        info = await asyncio.to_thread(s.registry.load_dir, name, path, replace=replace)
        return PlainTextResponse(
            f"Success: LoRA adapter '{name}' added successfully (version {info.version}).",
            headers={"X-Adapter-Version": info.version},
        )

    async def unload(request: Request) -> Response:
        loading_on()
        f = Fields(await _body(s, request))
        name = f.str("lora_name", required=True)
        f.neutral("lora_int_id")
        f.finish()
        info = s.registry.remove(name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{name}' removed successfully (version {info.version})."
        )

    async def metrics(request: Request) -> Response:
        return Response(s.metrics.render(), media_type=CONTENT_TYPE)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def guarded(fn):
        async def handler(request: Request) -> Response:
            status = CLIENT_CLOSED
            try:
                try:
                    response = await fn(request)
                except (JaxLoraError, BadRequestError) as err:
                    response = error_response(request.url.path, err)
                except Exception as err:
                    _log.error("%s failed: %s: %s", request.url.path, type(err).__name__, err)
                    response = error_response(request.url.path, _Internal(err))
                status = response.status_code
                return response
            finally:
                s.metrics.response(request.url.path, status)

        return handler

    return [
        Route("/v1/models", guarded(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(get_model), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/load_lora_adapter", guarded(load), methods=["POST"]),
        Route("/v1/unload_lora_adapter", guarded(unload), methods=["POST"]),
        Route(NATIVE_ENDPOINT, guarded(native), methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]


class _Internal(Exception):
    status, kind, param = 500, "server_error", None

    def __init__(self, err: Exception):
        super().__init__(f"internal error: {type(err).__name__}: {err}")


def _first_version(service: OpenAIService, chain) -> str:
    name = chain[0]
    info = None if name is None else service.registry.get(name)
    return BASE if info is None else info.version


def create_app(service: OpenAIService) -> Starlette:
    """The server: every route behind `SecurityMiddleware`; the lifespan starts and stops
    the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine: Any = service.engine
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    async def no_route(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = f"no route {request.method} {request.url.path} on this server."
        kind = _KINDS.get(status, "invalid_request_error")
        return JSONResponse(error_body(status, message, kind, None), status_code=status)

    refused = service.metrics.response
    middleware = [Middleware(SecurityMiddleware, policy=service.policy, on_refused=refused)]
    return Starlette(
        routes=_routes(service),
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={404: no_route, 405: no_route},
    )
