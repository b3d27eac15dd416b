"""Dynamic batching: a thread that gathers concurrent requests into one mixed batch.

A request is admitted into a bounded set of pending requests (`QueueFullError`, HTTP 503, when
`max_pending` are already waiting). The scheduler thread waits for the first pending request,
then for `window_s` more seconds (or until the largest batch size is reached), drops requests
that were cancelled (client gone) or whose deadline passed, and runs the rest, up to the largest
batch size, as ONE mixed batch on the engine: rows on different adapters and on the base model
together (spec SW-SERVE-2, SW-SERVE-6). Requests that arrive while a batch runs are older than
the window when it ends, so under load batches follow each other without idle time.

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora.serve.engine import Buckets, Engine, Row
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)), capacity=1, rank=2,
    ...                 buckets=Buckets((1, 4), (8,), 4))
    >>> with Scheduler(engine, window_s=0.01) as sched:
    ...     len(sched.submit(Row((1, 2), None, 2)).future.result().result.tokens)
    2
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time

from ..errors import AdapterNotFoundError, format_names
from .engine import Engine, Row, RowResult
from .errors import QueueFullError, RequestTimeoutError
from .metrics import Metrics

__all__ = ["BatchInfo", "Pending", "Scheduler", "Served"]


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """The batch a request ran in: real rows, padded shape, distinct adapters (None = base)."""

    number: int
    rows: int
    padded_rows: int
    padded_prompt: int
    adapters: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class Served:
    """A request's result and how it was served."""

    result: RowResult
    batch: BatchInfo
    queue_s: float


@dataclasses.dataclass(eq=False)
class Pending:
    """A submitted request; `future` resolves to `Served` or an exception."""

    row: Row
    deadline: float | None
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: bool = False


def _settle(future: concurrent.futures.Future, value=None, error: BaseException | None = None):
    if future.done():
        return
    try:
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled concurrently by the waiter
        pass


class Scheduler:
    """Collects requests for `window_s` and runs them as mixed batches on `engine`.

    Arguments:
        engine: the engine that runs batches.
        window_s: how long to wait for more requests after the first one arrives.
        max_pending: the most requests waiting at once; more are refused (503).
        metrics: where to record batches (a fresh `Metrics` by default).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        window_s: float = 0.005,
        max_pending: int = 256,
        metrics: Metrics | None = None,
    ):
        self.engine, self.window_s, self.max_pending = engine, float(window_s), int(max_pending)
        self.metrics = metrics or Metrics()
        self._pending: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._batches = 0
        self._thread = threading.Thread(target=self._loop, name="jaxlora-scheduler", daemon=True)

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still pending fail with `QueueFullError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        for p in self._pending:
            _settle(p.future, error=QueueFullError("the server is shutting down."))
        self._pending.clear()

    def pending(self) -> int:
        """Requests admitted and not yet in a running batch."""
        with self._cond:
            return len(self._pending)

    def submit(self, row: Row, timeout_s: float | None = None) -> Pending:
        """Admit `row` (raises `QueueFullError` when `max_pending` requests already wait)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = Pending(row, deadline)
        with self._cond:
            if self._stopping or len(self._pending) >= self.max_pending:
                self.metrics.count("rejected_queue_full")
                raise QueueFullError(
                    f"{len(self._pending)} requests are already waiting (max_pending="
                    f"{self.max_pending}); retry later or start the server with a larger "
                    "--max-pending."
                )
            self._pending.append(pending)
            self._cond.notify_all()
        return pending

    def cancel(self, pending: Pending) -> None:
        """Drop `pending` if it has not started running (client gone or timed out)."""
        with self._cond:
            pending.cancelled = True

    # -- the thread -------------------------------------------------------------------------
    def _take_batch(self) -> list[Pending] | None:
        largest = self.engine.buckets.batch_sizes[-1]
        with self._cond:
            while not self._stopping:
                if not self._pending:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                due = self._pending[0].enqueued + self.window_s
                if now < due and len(self._pending) < largest:
                    self._cond.wait(due - now)
                    continue
                taken: list[Pending] = []
                while self._pending and len(taken) < largest:
                    p = self._pending.popleft()
                    if p.cancelled:
                        self.metrics.count("cancelled")
                        _settle(p.future, error=RequestTimeoutError("cancelled before it ran."))
                    elif p.deadline is not None and now > p.deadline:
                        self.metrics.count("timed_out")
                        _settle(p.future, error=_timeout(p, now))
                    else:
                        taken.append(p)
                if taken:
                    return taken
            return None

    def _loop(self) -> None:
        while (taken := self._take_batch()) is not None:
            self._run(taken)

    def _admit(self, p: Pending, loaded) -> bool:
        """Whether `p` can run in this batch; if not, fail `p` alone (never its batch mates)."""
        try:
            self.engine.check(p.row)
            if p.row.adapter is not None and p.row.adapter not in loaded:
                raise AdapterNotFoundError(
                    f"adapter {p.row.adapter!r} was unloaded before the request ran. Loaded: "
                    f"{format_names(loaded)}."
                )
        except Exception as err:
            self.metrics.count("rejected_invalid")
            _settle(p.future, error=err)
            return False
        return True

    def _run(self, taken: list[Pending]) -> None:
        started = time.monotonic()
        try:
            snapshot = self.engine.snapshot()
            # unloaded while queued, or a row the engine cannot take: fail those rows only
            taken = [p for p in taken if self._admit(p, snapshot.slots)]
            if not taken:
                return
            rows = [p.row for p in taken]
            shape = self.engine.padded_shape(len(rows), max(len(r.tokens) for r in rows))
            results = self.engine.run(rows, snapshot)
        except Exception as err:  # a failed batch fails its requests, never the thread
            self.metrics.count("batch_errors")
            for p in taken:
                _settle(p.future, error=err)
            return
        elapsed = time.monotonic() - started
        self._batches += 1
        adapters = tuple(sorted({r.adapter for r in rows}, key=lambda a: (a is not None, a or "")))
        info = BatchInfo(self._batches, len(rows), shape[0], shape[1], adapters)
        generated = sum(len(r.tokens) for r in results)
        queue_times = [started - p.enqueued for p in taken]
        self.metrics.record_batch(info.rows, info.padded_rows, len(adapters), queue_times)
        self.metrics.record_tokens(generated, elapsed)
        for p, result, q in zip(taken, results, queue_times, strict=True):
            _settle(p.future, Served(result, info, q))


def _timeout(p: Pending, now: float) -> RequestTimeoutError:
    waited = now - p.enqueued
    return RequestTimeoutError(
        f"the request waited {waited:.3f} s in the queue, past its timeout; retry with a larger "
        "`timeout` or when the server is less busy."
    )
