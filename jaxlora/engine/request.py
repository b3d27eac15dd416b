"""What goes into the engine (`Request`) and what comes back (`Handle`, `Result`).

A `Handle` is the caller's side of one submitted request, safe to use from any thread and from
asyncio: `result()` blocks, `future` is a `concurrent.futures.Future` (`asyncio.wrap_future`
awaits it), `stream()` is an async iterator of `Token`s, `add_listener(fn)` calls `fn(token)`
on the engine's thread for every token. The engine thread is the only writer.

Example:
    >>> handle = Handle(Request((1, 2), max_new_tokens=2))
    >>> handle._emit(7, -0.5); handle._finish("length")
    >>> handle.result().tokens, handle.result().finish_reason
    ([7], 'length')
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..errors import ConfigError
from .errors import RequestTooLargeError
from .sampling import SamplingParams

__all__ = ["FINISH_REASONS", "Handle", "Request", "Result", "Token", "check_request"]

#: Why a request ended: a stop token or string, its length limit, `Engine.cancel`, its timeout.
FINISH_REASONS = ("stop", "length", "cancelled", "timeout")

_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Arguments:
        tokens: the prompt's token ids (non-empty).
        max_new_tokens: the most tokens to generate (>= 1).
        adapter: an adapter name the engine knows, or None for the base model.
        sampling: temperature / top-k / top-p / seed (`jaxlora.engine.sampling`).
        stop_tokens: ids that end the request (kept in its output).
        stop_strings: strings that end it once the decoded output contains one (the engine
            needs a `detokenize` function).
        timeout_s: seconds from submission after which it ends with reason "timeout".
    """

    tokens: tuple[int, ...]
    max_new_tokens: int
    adapter: str | None = None
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    stop_tokens: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "stop_tokens", "stop_strings"):
            object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class Token:
    """One generated token: its id, log-probability and index in the output."""

    id: int
    logprob: float
    index: int


@dataclasses.dataclass(frozen=True)
class Result:
    """A finished request.

    Arguments:
        tokens, logprobs: the generated ids (a stop token included) and their log-probs.
        finish_reason: one of `FINISH_REASONS`.
        stop: the stop token (int) or string that ended it, else None.
        steps: decode steps it took part in (prefill excluded).
        prefill_chunks: the chunk sizes its prompt was written with.
        queue_s: seconds from submission to admission into a row (None: never admitted).
        first_token_s, total_s: seconds from submission to its first token / to the end.
        live_rows, adapters: rows decoding in its first decode step and their distinct
            adapters (None: the base model); empty when it never reached a decode step.
        batch: the engine iteration of its first token: requests with the same `batch`
            decoded side by side from their first step (0: it never got a token).
    """

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    stop: int | str | None = None
    steps: int = 0
    prefill_chunks: tuple[int, ...] = ()
    queue_s: float | None = None
    first_token_s: float | None = None
    total_s: float = 0.0
    live_rows: int = 0
    adapters: tuple[str | None, ...] = ()
    batch: int = 0


def check_request(
    request: Request, vocab: int, max_len: int, stop_width: int, *, detokenize: bool
) -> None:
    """Raise, naming the limit, for a request no engine of these sizes can serve (SW-ENGINE-5).

    Example:
        >>> check_request(Request((1, 2), 3), 64, 8, 4, detokenize=False)
    """
    tokens = request.tokens
    if not tokens:
        raise ConfigError("the prompt is empty; every request needs at least one token.")
    bad = [
        t for t in (*tokens, *request.stop_tokens) if not isinstance(t, int) or not 0 <= t < vocab
    ]
    if bad:
        raise ConfigError(f"token ids must be ints in [0, {vocab}); got {bad[:5]}.")
    n = request.max_new_tokens
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_new_tokens must be a positive int, got {n!r}.")
    if len(tokens) + n > max_len:
        raise RequestTooLargeError(
            f"the prompt ({len(tokens)} tokens) plus max_new_tokens ({n}) is "
            f"{len(tokens) + n}, above this engine's limit of {max_len} (max_len)."
        )
    if len(request.stop_tokens) > stop_width:
        raise RequestTooLargeError(
            f"at most {stop_width} stop tokens, got {len(request.stop_tokens)}."
        )
    if request.stop_strings and not detokenize:
        raise ConfigError("stop strings need an engine with a `detokenize` function.")
    request.sampling.check(vocab)


class Handle:
    """The caller's side of a submitted request (see the module docstring)."""

    def __init__(self, request: Request):
        self.request = request
        self.id = next(_ids)
        self.submitted = time.monotonic()
        self.future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self._tokens: list[int] = []
        self._logprobs: list[float] = []
        self._listeners: list[Callable[[Token | None], None]] = []
        self._lock = threading.RLock()
        self.cancel_requested = False
        # engine-side bookkeeping (written by the engine thread only)
        self.info: dict[str, Any] = {"steps": 0, "chunks": (), "live_rows": 0, "adapters": ()}

    # -- caller side ------------------------------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """The tokens generated so far (a copy)."""
        with self._lock:
            return list(self._tokens)

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> Result:
        """The `Result` (blocks until the request ends; raises what made it fail)."""
        return self.future.result(timeout)

    def add_listener(self, fn: Callable[[Token | None], None]) -> None:
        """Call `fn(token)` for every token (those already generated first) and `fn(None)` at
        the end; later calls come from the engine's thread."""
        with self._lock:  # re-entrant: the backlog is delivered before any newer token
            for i, (t, lp) in enumerate(zip(self._tokens, self._logprobs, strict=True)):
                fn(Token(t, lp, i))
            finished = self.future.done()
            if not finished:
                self._listeners.append(fn)
        if finished:
            fn(None)

    async def stream(self) -> AsyncIterator[Token]:
        """`async for token in handle.stream()`: every token as it is generated.

        Raises what made the request fail, after the tokens generated before it.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Token | None] = asyncio.Queue()

        def deliver(token: Token | None) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, token)

        self.add_listener(deliver)
        while (token := await queue.get()) is not None:
            yield token
        self.future.result()  # re-raise a failure

    # -- engine side ------------------------------------------------------------------------
    def _emit(self, token: int, logprob: float) -> None:
        with self._lock:
            self._tokens.append(token)
            self._logprobs.append(logprob)
            event = Token(token, logprob, len(self._tokens) - 1)
            listeners = list(self._listeners)
        for fn in listeners:
            fn(event)

    def _close(self) -> list[Callable[[Token | None], None]]:
        with self._lock:
            listeners, self._listeners = self._listeners, []
        return listeners

    def _finish(self, reason: str, stop: int | str | None = None) -> None:
        now = time.monotonic()
        info = self.info
        with self._lock:
            result = Result(
                list(self._tokens),
                list(self._logprobs),
                reason,
                stop,
                info["steps"],
                info["chunks"],
                None if "admitted" not in info else info["admitted"] - self.submitted,
                None if "first" not in info else info["first"] - self.submitted,
                now - self.submitted,
                info["live_rows"],
                info["adapters"],
                info.get("batch", 0),
            )
        if not self.future.done():
            self.future.set_result(result)
        for fn in self._close():
            fn(None)

    def _fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        for fn in self._close():
            fn(None)
