"""The OpenAI service's state and how one request is answered, whole or streamed (SW-OAI-*).

`OpenAIService` holds what the routes of `jaxlora.serve.openai` serve (the engine, the adapter
registry, the limits, the metrics); `Run` is one `/v1/completions` or `/v1/chat/completions`
request: its fallback chain, its engine requests, and the answer built from them in OpenAI's
format (one JSON body, or server-sent-event chunks ending with `data: [DONE]`).

Example:
    >>> from jaxlora.engine import Engine, EngineConfig
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)),
    ...                 EngineConfig(rows=2, max_len=16, chunks=(8,), slots=1, rank=2))
    >>> OpenAIService(engine, model_name="tiny", adapter_root=".").chain("tiny", "id-1")
    (None,)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ..errors import AdapterNotFoundError, JaxLoraError
from .generation import Attempt, EngineLike, run_chain
from .hooks import RoutingHooks
from .metrics import Prometheus
from .openai_params import Job, Limits
from .registry import BASE, Registry
from .security import Policy, error_body
from .text import Text

__all__ = ["OpenAIService", "Run"]

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class OpenAIService:
    """What the OpenAI routes of `jaxlora.serve.openai` serve (see its module docstring).

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

    def finished(self, attempt: Attempt) -> None:
        """Count an attempt in the metrics once it has a result."""
        if attempt.result is not None:
            self.metrics.finished(attempt.adapter, attempt.result, len(attempt.choice.tokens))

    async def run_choice(
        self, choice, chain: tuple[str | None, ...], body: Any, deadline: float | None
    ) -> tuple[Attempt, list[dict]]:
        """`choice` down `chain` (`run_chain`: fallbacks, the confidence hook on the request
        `body`), every attempt counted in the metrics: the one wiring of every route."""
        return await run_chain(
            self.engine,
            self.text,
            self.registry,
            choice,
            chain,
            confidence=lambda a: self.hooks.confidence(body, a),
            min_confidence=self.hooks.min_confidence,
            on_attempt=self.finished,
            deadline=deadline,
        )

    def chain(self, model: str, request_id: str) -> tuple[str | None, ...]:
        """The adapters `model` names, in fallback order (None: the base model)."""
        if model in (self.model_name, BASE):
            return (None,)
        return self.hooks.plan({"adapter": model}, None, request_id).chain


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


class Run:
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

    async def one(self, choice) -> tuple[Attempt, list[dict]]:
        self.service.metrics.request(self.chain[0] or BASE, self.endpoint)
        return await self.service.run_choice(
            choice, self.chain, {"model": self.job.model}, self.deadline
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
            s.finished(attempt)
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
