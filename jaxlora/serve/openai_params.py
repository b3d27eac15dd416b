"""OpenAI request bodies -> what the engine runs (spec SW-OAI-2, SW-OAI-3).

`parse_completion` and `parse_chat` read a `/v1/completions` or `/v1/chat/completions` body
field by field (`jaxlora.serve.limits.Fields`): every field is either implemented, accepted
only with its neutral value (`presence_penalty: 0`, `logit_bias: {}`, `best_of: 1`, ...), or
refused with a 400 naming it; unknown fields are refused too. The result is a `Job`: the
prompts as token ids, the `Choice` of each of the `n` choices of each prompt, and how to
answer (stream, logprobs, usage).

Sampling (SW-OAI-3): `temperature` (default 1, as OpenAI), `top_p`, `top_k` (vLLM's extension;
-1 or 0: off), `seed` (any int, used modulo 2**32; absent: a random one per choice). Choice `i`
of a request with seed `s` uses seed `(s + i) mod 2**32`, so `n` choices differ and each one
equals a single request with its seed. Stop: `stop` (strings, not shown in the output),
`stop_token_ids` (vLLM's extension, kept in the output), and the model's EOS ids unless
`ignore_eos`.

Example:
    >>> from jaxlora.serve.limits import parse_json
    >>> job = parse_completion(parse_json(b'{"model": "m", "prompt": [5, 6], "max_tokens": 3,'
    ...     b' "temperature": 0}'), Limits(vocab=64, max_len=32), None)
    >>> job.choices[0][0].max_tokens, job.choices[0][0].sampling.temperature
    (3, 0.0)
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

from ..engine.sampling import SEED_LIMIT, SamplingParams
from .errors import BadRequestError
from .limits import Fields
from .text import Text

__all__ = [
    "Job",
    "Limits",
    "check_stop_width",
    "check_token_ids",
    "parse_chat",
    "parse_completion",
    "top_p_field",
]

_ROLES = ("system", "user", "assistant", "developer", "tool")
_MAX_STOPS = 16


@dataclasses.dataclass(frozen=True)
class Limits:
    """The engine's limits a request is checked against before it is submitted."""

    vocab: int
    max_len: int
    stop_width: int = 16
    max_n: int = 16
    default_max_tokens: int = 256
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """One OpenAI request: per prompt its token ids and its `n` choices."""

    model: str
    prompts: tuple[tuple[int, ...], ...]
    choices: tuple[tuple[Any, ...], ...]  # [prompt][i] -> generation.Choice
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    token_ids: bool = False
    chat: bool = False


def check_token_ids(value: Any, vocab: int, where: str, *, empty: bool = False) -> tuple[int, ...]:
    """`value` as token ids in `[0, vocab)`, or a 400 naming the field `where` (an empty list
    only when `empty`): the one token-id check of every route."""
    ok = isinstance(value, list) and (bool(value) or empty)
    if not ok or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        what = "a list" if empty else "a non-empty list"
        raise BadRequestError(f"`{where}` must be {what} of token ids (ints).", param=where)
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise BadRequestError(
            f"`{where}` holds token ids outside [0, {vocab}): {bad[:5]}.", param=where
        )
    return tuple(value)


def top_p_field(f: Fields) -> float:
    """`top_p` in (0, 1] (default 1.0), or a 400 naming it: the one check of every route."""
    top_p = f.number("top_p", 1.0, lo=0.0, hi=1.0)
    if top_p == 0:
        raise BadRequestError("`top_p` must be in (0, 1], got 0.", param="top_p")
    return top_p


def check_stop_width(ids: tuple[int, ...], limits: Limits, where: str, note: str = "") -> None:
    """A 400 naming `where` when a request has more stop token ids than the engine's
    `stop_width` (one check for every route)."""
    if len(ids) > limits.stop_width:
        raise BadRequestError(
            f"at most {limits.stop_width} stop token ids{note}, got {len(ids)}.", param=where
        )


def _prompts(value: Any, limits: Limits, text: Text | None) -> list[tuple[int, ...]]:
    """`prompt` as OpenAI allows it: a string, strings, token ids, lists of token ids."""
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(p, str) for p in value)
    ):
        if text is None:
            raise BadRequestError(
                "this server has no tokenizer: send `prompt` as token ids.", param="prompt"
            )
        items = [value] if isinstance(value, str) else value
        prompts = [tuple(text.encode(p)) for p in items]
        if not all(prompts):
            raise BadRequestError("`prompt` must not be empty.", param="prompt")
        return prompts
    if isinstance(value, list) and value and all(isinstance(p, list) for p in value):
        return [check_token_ids(p, limits.vocab, "prompt") for p in value]
    return [check_token_ids(value, limits.vocab, "prompt")]


def _stops(f: Fields) -> tuple[str, ...]:
    value = f.raw("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise BadRequestError("`stop` must be a non-empty string or a list of them.", param="stop")
    if len(items) > _MAX_STOPS:
        raise BadRequestError(f"at most {_MAX_STOPS} stop strings, got {len(items)}.", param="stop")
    return tuple(items)


def _sampling(f: Fields, limits: Limits, n: int) -> list[SamplingParams]:
    temperature = f.number("temperature", 1.0, lo=0.0)
    top_p = top_p_field(f)
    top_k = f.int("top_k", 0, lo=-1, hi=limits.vocab)
    seed = f.int("seed", None, lo=-(2**63), hi=2**64 - 1)
    base = secrets.randbelow(SEED_LIMIT) if seed is None else seed % SEED_LIMIT
    return [
        SamplingParams(temperature, max(top_k, 0), top_p, (base + i) % SEED_LIMIT) for i in range(n)
    ]


def _job(
    f: Fields,
    limits: Limits,
    text: Text | None,
    prompts: Sequence[tuple[int, ...]],
    chat: bool,
    logprobs: bool,
) -> Job:
    from .generation import Choice

    model = f.str("model", required=True)
    n = f.int("n", 1, lo=1, hi=limits.max_n)
    sampling = _sampling(f, limits, n)
    stops = _stops(f)
    stop_ids = (
        check_token_ids(f.raw("stop_token_ids"), limits.vocab, "stop_token_ids")
        if f.has("stop_token_ids")
        else ()
    )
    if not f.bool("ignore_eos", False) and text is not None:
        stop_ids += tuple(i for i in text.eos_ids if i not in stop_ids)
    check_stop_width(stop_ids, limits, "stop_token_ids", " (the model's EOS included)")
    asked = f.int("max_tokens", None, lo=1)
    if chat:  # OpenAI's newer name wins
        asked = f.int("max_completion_tokens", None, lo=1) or asked
    stream = f.bool("stream", False)
    options = Fields(f.raw("stream_options", {}), "stream_options")
    include_usage = options.bool("include_usage", False)
    options.neutral("continuous_usage_stats", False)
    options.finish()
    if not stream and f.has("stream_options"):
        raise BadRequestError("`stream_options` needs `stream: true`.", param="stream_options")
    token_ids = f.bool("return_token_ids", False)
    f.str("user")  # an end-user id: accepted, it changes nothing (SW-OAI-2)
    for key_, neutral in (
        ("presence_penalty", (0, 0.0)),
        ("frequency_penalty", (0, 0.0)),
        ("logit_bias", ({},)),
        ("repetition_penalty", (1, 1.0)),
    ):
        f.neutral(key_, *neutral)
    choices = []
    for p, tokens in enumerate(prompts):
        room = limits.max_len - len(tokens)
        max_tokens = min(limits.default_max_tokens, room) if asked is None else asked
        if room < 1 or max_tokens > room:
            raise BadRequestError(
                f"`max_tokens` = {max_tokens} plus prompt {p}'s {len(tokens)} tokens exceeds "
                f"this model's maximum context length of {limits.max_len} tokens; shorten the "
                "prompt or lower max_tokens.",
                param="max_tokens",
            )
        choices.append(
            tuple(
                Choice(tokens, max_tokens, s, stop_ids, stops, limits.timeout_s) for s in sampling
            )
        )
    return Job(
        model, tuple(prompts), tuple(choices), stream, include_usage, logprobs, token_ids, chat
    )


def parse_completion(body: Any, limits: Limits, text: Text | None) -> Job:
    """A `/v1/completions` body -> `Job` (`BadRequestError` naming the field)."""
    f = Fields(body)
    if not f.has("prompt"):
        raise BadRequestError("`prompt` is required.", param="prompt")
    prompts = _prompts(f.raw("prompt"), limits, text)
    logprobs = f.int("logprobs", None, lo=0, hi=5)
    if logprobs:
        raise BadRequestError(
            f"`logprobs` = {logprobs} asks for top alternatives, which this server does not "
            "return; send `logprobs: 0` for the chosen tokens' log-probabilities.",
            param="logprobs",
        )
    f.neutral("echo", False)
    f.neutral("best_of", 1)
    f.neutral("suffix", "")
    job = _job(f, limits, text, prompts, False, logprobs == 0)
    f.finish()
    return job


def _content(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            p = Fields(part, f"{where}.content[{i}]")
            if p.str("type", required=True) != "text":
                raise BadRequestError(
                    f"`{where}.content[{i}].type` = {part.get('type')!r}: only text parts are "
                    "supported.",
                    param="messages",
                )
            parts.append(p.str("text", required=True))
            p.finish()
        return "".join(parts)
    raise BadRequestError(f"`{where}.content` must be a string or text parts.", param="messages")


def parse_chat(body: Any, limits: Limits, text: Text | None) -> Job:
    """A `/v1/chat/completions` body -> `Job`: the messages through the chat template."""
    f = Fields(body)
    raw = f.raw("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("`messages` must be a non-empty list.", param="messages")
    messages = []
    for i, item in enumerate(raw):
        m = Fields(item, f"messages[{i}]")
        role = m.str("role", required=True)
        if role not in _ROLES:
            raise BadRequestError(
                f"`messages[{i}].role` = {role!r}; use one of {', '.join(_ROLES)}.",
                param="messages",
            )
        message = {"role": role, "content": _content(m.raw("content"), f"messages[{i}]")}
        if m.has("name"):
            message["name"] = m.str("name")
        m.finish()
        messages.append(message)
    if text is None:
        raise BadRequestError("this server has no tokenizer, so no chat template.")
    add_generation_prompt = f.bool("add_generation_prompt", True)
    prompt = tuple(text.encode_chat(messages, add_generation_prompt))
    if not prompt:
        raise BadRequestError("the chat template made an empty prompt.", param="messages")
    logprobs = f.bool("logprobs", False)
    top = f.int("top_logprobs", None, lo=0, hi=20)
    if top:
        raise BadRequestError(
            f"`top_logprobs` = {top}: this server does not return top alternatives; send 0 or "
            "leave it out.",
            param="top_logprobs",
        )
    f.neutral("tools", [])
    f.neutral("tool_choice", "none")
    f.neutral("parallel_tool_calls", False)
    f.neutral("response_format", {"type": "text"})
    f.neutral("continue_final_message", False)
    job = _job(f, limits, text, [prompt], True, logprobs)
    f.finish()
    return job
