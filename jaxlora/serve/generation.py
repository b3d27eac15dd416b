"""One choice of one request on the engine: text, stop strings, errors, fallback chains.

Spec SW-OAI-4..7, SW-ROBUST-1..3. `Attempt` runs one engine request for one adapter version
and turns its tokens into text pieces: the `Detokenizer` (no piece ends inside a character,
special tokens hidden), then `StopStrings` (a stop string ends the choice, spanning tokens or
not; the engine request is then cancelled, and the text and tokens end with the token that
completed it). A token whose log-probability is not finite means the row's logits held NaN or
Inf: the attempt ends with `NonFiniteOutputError` (HTTP 422) and its row is cancelled, the
rows next to it are untouched. `run_chain` tries the adapters of a fallback chain in order,
skipping names that are not loaded and attempts that fail that way, and answers the first
attempt whose confidence reaches the bar (or the last one that produced output).

Example:
    >>> Choice((1, 2), max_tokens=4).stop_ids
    ()
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol

from ..engine.request import Handle, Request, Result
from ..engine.sampling import SamplingParams
from ..errors import AdapterNotFoundError
from .errors import NonFiniteOutputError, RequestTimeoutError
from .registry import BASE, AdapterInfo, Registry
from .text import StopStrings, Text

__all__ = ["Attempt", "Choice", "EngineLike", "run_chain"]


class EngineLike(Protocol):
    """What the serving layer needs of an engine; `jaxlora.engine.Engine` provides it.

    `submit` queues a request at once (raising, with nothing queued, for one it cannot serve)
    and returns a `Handle` whose `stream()` yields every token as it is generated; `cancel`
    ends a request at the next iteration; adapters are added and removed by engine key.
    """

    def submit(self, request: Request) -> Handle: ...

    def cancel(self, handle: Handle) -> None: ...

    def add_adapter(self, name: str, adapter: Any, source: str | None = None) -> int: ...

    def remove_adapter(self, name: str) -> Any: ...

    def metrics(self) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one choice asks of the engine (the adapter comes from the chain)."""

    tokens: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    timeout_s: float | None = None


@dataclasses.dataclass
class Piece:
    """Text ready to send, and the tokens (id, logprob) produced since the previous piece."""

    text: str
    tokens: list[tuple[int, float]]


class Attempt:
    """One engine request under one adapter version (module docstring).

    `async for piece in attempt.pieces()` streams it; afterwards `text`, `tokens`,
    `logprobs`, `finish_reason` and `result` describe the whole output.
    """

    def __init__(
        self, engine: EngineLike, text: Text | None, choice: Choice, info: AdapterInfo | None
    ):
        self.engine, self.codec, self.choice, self.info = engine, text, choice, info
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None
        self.result: Result | None = None
        self.handle: Handle | None = None

    @property
    def adapter(self) -> str:
        return BASE if self.info is None else self.info.name

    @property
    def version(self) -> str:
        return BASE if self.info is None else self.info.version

    def submit(self) -> None:
        c = self.choice
        request = Request(
            c.tokens,
            c.max_tokens,
            adapter=None if self.info is None else self.info.key,
            sampling=c.sampling,
            stop_tokens=c.stop_ids,
            timeout_s=c.timeout_s,
        )
        self.handle = self.engine.submit(request)

    async def pieces(self) -> AsyncIterator[Piece]:
        if self.handle is None:
            self.submit()
        handle = self.handle
        assert handle is not None
        detok = None if self.codec is None else self.codec.detokenizer()
        stops = StopStrings(self.choice.stop_strings)
        pending: list[tuple[int, float]] = []
        try:
            async for token in handle.stream():
                if not math.isfinite(token.logprob):
                    self.engine.cancel(handle)
                    raise NonFiniteOutputError(
                        f"the model's logits under adapter {self.adapter!r} were not finite "
                        f"(NaN/Inf) at output token {token.index}; this adapter cannot serve "
                        "this request. Check its weights and lora_alpha."
                    )
                self.tokens.append(token.id)
                self.logprobs.append(token.logprob)
                pending.append((token.id, token.logprob))
                out, stopped = stops.feed("" if detok is None else detok.step(token.id))
                if out or stopped:
                    self.text += out
                    yield Piece(out, pending)
                    pending = []
                if stopped:
                    self.finish_reason = "stop"
                    self.engine.cancel(handle)
                    break
            result = await _result(handle)
            self.result = result
            if self.finish_reason is None:
                if result.finish_reason == "timeout":
                    raise RequestTimeoutError(
                        f"the request did not finish within its timeout of "
                        f"{self.choice.timeout_s} s; retry with a larger timeout or later."
                    )
                self.finish_reason = "stop" if result.finish_reason == "stop" else "length"
                tail, stopped = stops.feed("" if detok is None else detok.flush())
                tail += stops.flush()
                if stopped:
                    self.finish_reason = "stop"
                if tail or pending:
                    self.text += tail
                    yield Piece(tail, pending)
        finally:
            if not handle.done():
                self.engine.cancel(handle)

    async def run(self) -> Attempt:
        """Consume the whole output (non-streamed)."""
        async for _ in self.pieces():
            pass
        return self


async def _result(handle: Handle) -> Result:
    import asyncio

    return await asyncio.wrap_future(handle.future)


def _mean_logprob(attempt: Attempt) -> float:
    return sum(attempt.logprobs) / max(len(attempt.logprobs), 1)


async def run_chain(
    engine: EngineLike,
    text: Text | None,
    registry: Registry,
    choice: Choice,
    chain: Sequence[str | None],
    *,
    confidence: Callable[[Attempt], float] = _mean_logprob,
    min_confidence: float = -math.inf,
    on_attempt: Callable[[Attempt], None] | None = None,
    deadline: float | None = None,
) -> tuple[Attempt, list[dict[str, Any]]]:
    """Run `choice` down the fallback `chain` (None: the base model); returns the answering
    attempt and the record of every attempt (SW-ROBUST-2). With a `deadline`
    (`time.monotonic()`), all the attempts share it: each gets only the time left, and none
    starts after it (`RequestTimeoutError`, SW-SERVE-6)."""
    record: list[dict[str, Any]] = []
    answer: tuple[Attempt, int] | None = None
    error: Exception | None = None
    for i, name in enumerate(chain):
        last = i == len(chain) - 1
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeoutError(
                    f"the request ran past its timeout with {i} of {len(chain)} fallback "
                    "attempts done; retry with a larger timeout or later."
                )
            if choice.timeout_s is None or left < choice.timeout_s:
                choice = dataclasses.replace(choice, timeout_s=left)
        try:
            info = None if name is None else registry.acquire(name)
        except AdapterNotFoundError as err:
            record.append({"adapter": name, "skipped": "not loaded"})
            error = err
            continue
        attempt = Attempt(engine, text, choice, info)
        try:
            await attempt.run()
        except NonFiniteOutputError as err:
            record.append({"adapter": attempt.adapter, "error": "non-finite logits"})
            error = err
            continue
        finally:
            if on_attempt is not None:
                on_attempt(attempt)
            if info is not None:
                registry.release(info)
        score = float(confidence(attempt))
        accepted = score >= min_confidence or last
        record.append(
            {
                "adapter": attempt.adapter,
                "version": attempt.version,
                "confidence": score,
                "accepted": accepted,
            }
        )
        answer = (attempt, len(record) - 1)
        if accepted:
            return attempt, record
    if answer is not None:  # the last entries failed: answer the last one that produced output
        record[answer[1]]["accepted"] = True
        return answer[0], record
    assert error is not None
    raise error
