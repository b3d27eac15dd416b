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
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import AdapterExistsError, AdapterNotFoundError, JaxLoraError
from .errors import CLIENT_CLOSED, BadRequestError
from .generation import Attempt, EngineLike, run_chain
from .hooks import RoutingHooks
from .limits import Fields, parse_json, read_body
from .metrics import CONTENT_TYPE, Prometheus
from .native import ENDPOINT as NATIVE_ENDPOINT
from .native import generate_answer, race
from .openai_params import Job, Limits, parse_chat, parse_completion
from .registry import BASE, Registry
from .security import Policy, SecurityMiddleware, error_body, is_admin
from .text import Text

__all__ = ["CLIENT_CLOSED", "OpenAIService", "create_app", "error_response"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class OpenAIService:
    """What the OpenAI routes serve (see the module docstring).

    Arguments:
        engine: the engine (`jaxlora.engine.Engine`, started by the app's lifespan).
        model_name: the base model's name in `model` and `/v1/models`.
        adapter_root: runtime loads read only directories under it (SW-SEC-5).
        text: the tokenizer and chat template (None: token-id prompts only, no chat).
        hooks: A/B splits and fallback chains, by task name.
        policy: the security policy.
        runtime_loading: serve `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
        max_adapter_delta: the load-time magnitude bound (SW-ADAPT-3).
        default_max_tokens: `max_tokens` when a request gives none (within the context).
        max_n: the most choices per request.
        max_body_bytes: larger bodies are refused (413).
        timeout_s: each engine request ends after this many seconds (504).
        model_source: the base model's directory, shown to admins.
    """

    engine: EngineLike
    model_name: str
    adapter_root: str | Path
    text: Text | None = None
    hooks: RoutingHooks = dataclasses.field(default_factory=RoutingHooks)
    policy: Policy = dataclasses.field(default_factory=Policy)
    runtime_loading: bool = False
    max_adapter_delta: float = 1e4
    default_max_tokens: int = 256
    max_n: int = 16
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0
    model_source: str | None = None

    def __post_init__(self) -> None:
        engine: Any = self.engine
        model = engine.model
        self.registry = Registry(
            engine,
            root=self.adapter_root,
            max_delta=self.max_adapter_delta,
            layer_shapes=model.lora_shapes(),
        )
        self.metrics = Prometheus(engine.metrics)
        config = engine.config
        self.limits = Limits(
            vocab=model.config.vocab_size,
            max_len=config.max_len,
            stop_width=config.stop_width,
            max_n=self.max_n,
            default_max_tokens=self.default_max_tokens,
            timeout_s=self.timeout_s,
        )
        self.created = int(time.time())

    def chain(self, model: str, request_id: str) -> tuple[str | None, ...]:
        """The adapters `model` names, in fallback order (None: the base model)."""
        if model in (self.model_name, BASE):
            return (None,)
        return self.hooks.plan({"adapter": model}, None, request_id).chain


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


def _usage(job: Job, attempts: list[list[Attempt]]) -> dict[str, int]:
    prompt = sum(len(p) * len(c) for p, c in zip(job.prompts, job.choices, strict=True))
    completion = sum(len(a.tokens) for row in attempts for a in row)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _logprobs(service: OpenAIService, job: Job, tokens: list[tuple[int, float]], offset: int):
    if not job.logprobs:
        return None
    text = service.text
    pieces = [("" if text is None else text.token_text(t), lp) for t, lp in tokens]
    if job.chat:
        return {
            "content": [
                {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                for s, lp in pieces
            ]
        }
    offsets, at = [], offset
    for s, _ in pieces:
        offsets.append(at)
        at += len(s)
    return {
        "tokens": [s for s, _ in pieces],
        "token_logprobs": [lp for _, lp in pieces],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def _choice(
    service,
    job: Job,
    index: int,
    attempt: Attempt,
    record,
    delta: str | None,
    tokens: list[tuple[int, float]],
    finish: str | None,
    offset: int = 0,
) -> dict:
    text = attempt.text if delta is None else delta
    out: dict[str, Any] = {"index": index}
    if job.chat:
        key = "message" if delta is None else "delta"
        out[key] = {"role": "assistant", "content": text} if delta is None else {"content": text}
    else:
        out["text"] = text
    out["logprobs"] = _logprobs(service, job, tokens, offset)
    out["finish_reason"] = finish
    out["adapter"], out["adapter_version"] = attempt.adapter, attempt.version
    if job.token_ids:
        out["token_ids"] = [t for t, _ in tokens]
    if record and len(record) > 1:
        out["attempts"] = record
    return out


def _envelope(job: Job, request_id: str, created: int, version: str, chunk: bool) -> dict:
    kind = (
        ("chat.completion.chunk" if chunk else "chat.completion")
        if job.chat
        else ("text_completion")
    )
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": job.model,
        "system_fingerprint": f"jaxlora-{version.removeprefix('sha256:')[:16]}",
    }


class _Run:
    """One OpenAI request: its job, chains and the attempts that answered each choice."""

    def __init__(self, service: OpenAIService, job: Job, endpoint: str):
        self.service, self.job, self.endpoint = service, job, endpoint
        self.id = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex
        self.chain: tuple[str | None, ...] = service.chain(job.model, self.id)
        name = self.chain[0] if len(self.chain) == 1 else None
        if name is not None and service.registry.get(name) is None:
            raise AdapterNotFoundError(f"the model `{job.model}` does not exist.")
        self.created = int(time.time())
        timeout = service.limits.timeout_s
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _finished(self, attempt: Attempt) -> None:
        if attempt.result is not None:
            self.service.metrics.finished(
                attempt.adapter, attempt.result, len(attempt.choice.tokens)
            )

    async def one(self, choice) -> tuple[Attempt, list[dict]]:
        s = self.service
        s.metrics.request(self.chain[0] or BASE, self.endpoint)
        body = {"model": self.job.model}
        return await run_chain(
            s.engine,
            s.text,
            s.registry,
            choice,
            self.chain,
            confidence=lambda a: s.hooks.confidence(body, a),
            min_confidence=s.hooks.min_confidence,
            on_attempt=self._finished,
            deadline=self.deadline,
        )

    def start(self) -> None:
        """Submit a streamed request without a fallback chain now, so that its errors are
        answered with their status before any byte of the stream is sent."""
        self.live: list[Attempt] = []
        s, name = self.service, self.chain[0]
        if len(self.chain) > 1:
            return
        try:
            for choice in (c for row in self.job.choices for c in row):
                s.metrics.request(name or BASE, self.endpoint)
                info = None if name is None else s.registry.acquire(name)
                self.live.append(Attempt(s.engine, s.text, choice, info))
                self.live[-1].submit()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release what `start` holds: cancel its engine requests, unpin its versions."""
        s = self.service
        for attempt in self.live:
            if attempt.handle is not None and not attempt.handle.done():
                s.engine.cancel(attempt.handle)
            self._finished(attempt)
            if attempt.info is not None:
                s.registry.release(attempt.info)
        self.live = []

    async def answer(self) -> dict:
        flat = [c for row in self.job.choices for c in row]
        done = await asyncio.gather(*(self.one(c) for c in flat))
        attempts = [a for a, _ in done]
        body = _envelope(self.job, self.id, self.created, attempts[0].version, False)
        body["choices"] = [
            _choice(
                self.service,
                self.job,
                i,
                a,
                rec,
                None,
                list(zip(a.tokens, a.logprobs, strict=True)),
                a.finish_reason,
            )
            for i, (a, rec) in enumerate(done)
        ]
        body["usage"] = _usage(self.job, [attempts])
        return body

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE chunks of every choice, interleaved as they come, then usage and `[DONE]`."""
        flat = [c for row in self.job.choices for c in row]
        queue: asyncio.Queue = asyncio.Queue()
        attempts: list[Attempt | None] = [None] * len(flat)

        async def produce(i: int, choice) -> None:
            try:
                if len(self.chain) > 1:  # a fallback chain: answer once an attempt is accepted
                    attempt, record = await self.one(choice)
                    tokens = list(zip(attempt.tokens, attempt.logprobs, strict=True))
                    await queue.put((i, attempt, record, attempt.text, tokens, None))
                else:
                    attempt, offset = self.live[i], 0
                    async for piece in attempt.pieces():
                        await queue.put((i, attempt, None, piece.text, piece.tokens, offset))
                        offset += len(piece.text)
                attempts[i] = attempt
                await queue.put((i, attempt, None, "", [], "end"))
            except Exception as err:
                await queue.put((i, None, None, None, None, err))

        tasks = [asyncio.ensure_future(produce(i, c)) for i, c in enumerate(flat)]
        try:
            left, started = len(flat), set()
            while left:
                i, attempt, record, text, tokens, extra = await queue.get()
                if isinstance(extra, Exception):
                    err = extra
                    body = error_body(
                        getattr(err, "status", 500),
                        str(err),
                        getattr(err, "kind", "server_error"),
                        None,
                    )
                    if not isinstance(err, JaxLoraError):
                        _log.error("stream failed: %s: %s", type(err).__name__, err)
                    yield f"data: {json.dumps(body)}\n\n".encode()
                    left -= 1
                    continue
                head = _envelope(self.job, self.id, self.created, attempt.version, True)
                finish = attempt.finish_reason if extra == "end" else None
                if self.job.chat and i not in started:
                    started.add(i)
                    first = head | {
                        "choices": [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    }
                    yield f"data: {json.dumps(first)}\n\n".encode()
                if extra == "end" and not self.job.chat:
                    text = ""
                if text or tokens or finish:
                    c = _choice(
                        self.service,
                        self.job,
                        i,
                        attempt,
                        record,
                        text,
                        tokens,
                        finish,
                        extra if isinstance(extra, int) else 0,
                    )
                    if self.job.chat and finish:
                        c["delta"] = {}
                    yield f"data: {json.dumps(head | {'choices': [c]})}\n\n".encode()
                left -= extra == "end"
            if self.job.include_usage:
                done = [a for a in attempts if a is not None]
                head = _envelope(
                    self.job, self.id, self.created, done[0].version if done else BASE, True
                )
                usage = head | {"choices": [], "usage": _usage(self.job, [done])}
                yield f"data: {json.dumps(usage)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            self.close()


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
        run = _Run(s, job, request.url.path)
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
