"""The native token-level route `POST /generate` (spec SW-SERVE-1..10, SW-SERVE-13).

A route of the one server (`jaxlora.serve.openai.create_app`): the same registry (adapter
versions), `run_chain` (fallback chains, non-finite rows), routing hooks, security middleware,
JSON limits and Prometheus metrics as the OpenAI routes. What it adds over `/v1/completions`
with token-id prompts: greedy by default, the adapter chosen by the `adapter` field, the
`X-Task-Type` header or a classifier (SW-SERVE-8), A/B arms fixed by the request `id`
(SW-SERVE-9), a request's own `fallback` list and `timeout`, and the routing decision in the
answer (`route`).

Body fields (any other is a 400 naming it): `tokens` (token ids) or `text` (with the model's
tokenizer), `adapter` (a name, a task, `base` or null), `fallback`, `max_new_tokens`,
`temperature` (default 0), `top_k`, `top_p`, `seed` (default: derived from `id`), `stop`
(token ids, kept in the output), `id`, `timeout` and `metadata` (an object the server does not
read, for the classifier). `model` is refused: it is the OpenAI routes' name for the adapter.
The answer: `id`, `adapter`, `adapter_version`, `tokens`, `logprobs`, `finish_reason`,
`route` and (with a tokenizer) `text`; nothing about other requests.

Example:
    >>> from jaxlora.serve.limits import parse_json
    >>> from jaxlora.serve.openai_params import Limits
    >>> job = parse_generate(parse_json(b'{"tokens": [1, 2], "max_new_tokens": 3, "id": "r1"}'),
    ...                      Limits(vocab=64, max_len=16), None)
    >>> job.choice.max_tokens, job.choice.sampling.temperature, job.id
    (3, 0.0, 'r1')
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..engine.sampling import SEED_LIMIT, SamplingParams
from ..errors import AdapterNotFoundError
from .errors import (
    BadRequestError,
    RequestTimeoutError,
    RequestTooLargeError,
    UnsupportedFieldError,
)
from .generation import Choice
from .limits import Fields
from .openai_params import Limits, check_stop_width, check_token_ids, top_p_field
from .registry import BASE
from .text import Text

__all__ = ["GenerateJob", "generate_answer", "parse_generate", "race"]

ENDPOINT = "/generate"


@dataclasses.dataclass(frozen=True)
class GenerateJob:
    """A parsed `POST /generate` body: the request id, what the engine runs, the time limit."""

    id: str
    choice: Choice
    timeout_s: float | None


def _prompt(f: Fields, limits: Limits, text: Text | None) -> tuple[int, ...]:
    if f.has("tokens") and f.has("text"):
        raise BadRequestError("give `tokens` or `text`, not both.", param="text")
    if not f.has("text"):
        return check_token_ids(f.raw("tokens"), limits.vocab, "tokens")
    if text is None:
        raise BadRequestError(
            "this server has no tokenizer: send `tokens` (token ids).", param="text"
        )
    value = f.str("text")
    tokens = tuple(text.encode(value)) if value else ()
    if not tokens:
        raise BadRequestError("`text` must be a non-empty string.", param="text")
    return tokens


def parse_generate(body: Any, limits: Limits, text: Text | None) -> GenerateJob:
    """A `POST /generate` body -> `GenerateJob` (`BadRequestError` naming the field; 413 for
    a prompt plus `max_new_tokens` above the context). `adapter` and `fallback` are read by
    the routing hooks (`RoutingHooks.plan`)."""
    f = Fields(body)
    if "model" in f.body:
        raise UnsupportedFieldError(
            "`model` is not a field of POST /generate: name the adapter (or task, or `base`) in "
            "`adapter`. On /v1/completions `model` names it.",
            param="model",
        )
    request_id = f.str("id") or uuid.uuid4().hex
    tokens = _prompt(f, limits, text)
    room = limits.max_len - len(tokens)
    if room < 1:
        raise RequestTooLargeError(
            f"the prompt length is {len(tokens)}, above this server's limit of "
            f"{limits.max_len - 1} (max_len {limits.max_len} minus one new token)."
        )
    asked = f.int("max_new_tokens", None, lo=1)
    if asked is not None and asked > room:
        raise RequestTooLargeError(
            f"max_new_tokens is {asked}; with the prompt's {len(tokens)} tokens the limit of "
            f"this server (max_len {limits.max_len}) is {room}."
        )
    max_new = min(limits.default_max_tokens, room) if asked is None else asked
    temperature = f.number("temperature", 0.0, lo=0.0)
    top_k = f.int("top_k", 0, lo=0, hi=limits.vocab)
    top_p = top_p_field(f)
    default_seed = int(uuid.uuid5(uuid.NAMESPACE_OID, request_id)) % SEED_LIMIT
    seed = f.int("seed", default_seed, lo=0, hi=SEED_LIMIT - 1)
    stop = check_token_ids(f.raw("stop"), limits.vocab, "stop", empty=True) if f.has("stop") else ()
    check_stop_width(stop, limits, "stop")
    timeout = f.number("timeout", None, lo=0.0)
    if timeout is not None and timeout <= 0:
        raise BadRequestError("`timeout` must be a number of seconds > 0.", param="timeout")
    if limits.timeout_s is not None:
        timeout = limits.timeout_s if timeout is None else min(timeout, limits.timeout_s)
    if f.has("metadata") and not isinstance(f.raw("metadata"), Mapping):
        raise BadRequestError("`metadata` must be a JSON object.", param="metadata")
    f.finish(also=("adapter", "fallback"))
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    return GenerateJob(request_id, Choice(tokens, max_new, sampling, stop, (), timeout), timeout)


async def race(
    work: Awaitable[Any], disconnected: Awaitable[Any], timeout_s: float | None
) -> tuple[bool, Any]:
    """`(done, result)`: the result of `work`, or `(False, None)` when `disconnected` ends
    first (the work is cancelled); `RequestTimeoutError` after `timeout_s` seconds."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(disconnected)
    try:
        await asyncio.wait({task, gone}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return True, task.result()
    task.cancel()  # its engine requests are cancelled, their adapter versions released
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if gone.done() and not gone.cancelled():
        return False, None
    raise RequestTimeoutError(
        f"no result within the request's timeout of {timeout_s} s; retry with a larger "
        "`timeout` or when the server is less busy."
    )


async def generate_answer(
    service: Any,
    body: Any,
    header: str | None,
    disconnected: Callable[[], Awaitable[Any]],
) -> tuple[dict[str, Any], str] | None:
    """Answer one `POST /generate` body on `service` (an `OpenAIService`): `(JSON answer,
    adapter version)`, or None when the client went away."""
    s = service
    job = parse_generate(body, s.limits, s.text)
    plan = s.hooks.plan(body, header, job.id)
    chain = tuple(None if n == s.model_name else n for n in plan.chain)
    if len(chain) == 1 and chain[0] is not None and s.registry.get(chain[0]) is None:
        raise AdapterNotFoundError(
            f"no adapter or task named {chain[0]!r} is served here; see GET /v1/models."
        )
    started = time.monotonic()
    deadline = None if job.timeout_s is None else started + job.timeout_s
    s.metrics.request(chain[0] or BASE, ENDPOINT)

    work = s.run_choice(job.choice, chain, body, deadline)
    done, result = await race(work, disconnected(), job.timeout_s)
    if not done:
        return None
    attempt, record = result
    out: dict[str, Any] = {
        "id": job.id,
        "adapter": attempt.adapter,
        "adapter_version": attempt.version,
        "tokens": attempt.tokens,
        "logprobs": attempt.logprobs,
        "finish_reason": attempt.finish_reason,
        "route": plan.route | ({"attempts": record} if len(chain) > 1 else {}),
    }
    if s.text is not None:
        out["text"] = attempt.text
    return out, attempt.version
