"""The server's side of continuous batching: HTTP rows in, futures of results out.

A request is submitted to the engine at once (`QueueFullError`, HTTP 503, when `max_pending`
requests already wait for a row); the engine thread admits it into a free row at its next
iteration, whatever the other rows are doing, and it leaves its row as soon as it stops, so a
short request never waits for a long one (spec SW-SERVE-2, SW-ENGINE-1). Rows on different
adapters and on the base model decode together in every step. A request cancelled (client
gone) or past its deadline frees its row at the next iteration (SW-SERVE-6, SW-ENGINE-8).

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> from jaxlora.serve.engine import Buckets, Engine, Row
    >>> engine = Engine(Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8)), capacity=1, rank=2,
    ...                 buckets=Buckets((1, 4), (8,), 4))
    >>> with Scheduler(engine) as sched:
    ...     len(sched.submit(Row((1, 2), None, 2)).future.result().result.tokens)
    2
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time

from ..engine import EngineStoppedError, Handle, Result
from ..engine import QueueFullError as EngineQueueFull
from .engine import Engine, Row, RowResult
from .errors import QueueFullError, RequestTimeoutError
from .metrics import Metrics

__all__ = ["BatchInfo", "Pending", "Scheduler", "Served"]


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """How a request was batched: the engine iteration of its first token (requests with the
    same number decoded side by side from their first step), the rows decoding in its first
    decode step, the pool size, its padded prompt (sum of its prefill chunks) and the
    distinct adapters of that first step (None = base)."""

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
    handle: Handle | None = None
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)


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
    """Runs `engine`'s iterations on a thread and turns engine results into `Served`.

    Arguments:
        engine: the server's engine.
        window_s: unused (continuous batching admits a request at the next iteration); kept
            so that existing callers keep working.
        max_pending: the most requests waiting for a row; more are refused (503).
        metrics: where to record requests (a fresh `Metrics` by default).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        window_s: float = 0.0,
        max_pending: int = 256,
        metrics: Metrics | None = None,
    ):
        self.engine, self.max_pending = engine, int(max_pending)
        self.metrics = metrics or Metrics()
        self._started = False
        self._batches: dict[int, None] = {}  # recent first-token iterations (insertion order)
        self._lock = threading.Lock()

    def __enter__(self) -> Scheduler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start serving (the engine's thread runs while any scheduler on it runs)."""
        if not self._started:
            self._started = True
            self.engine.start()

    def stop(self) -> None:
        """Stop serving; when no other scheduler runs on the engine, its thread stops and
        unfinished requests fail with `EngineStoppedError` (503)."""
        if self._started:
            self._started = False
            self.engine.stop()

    def pending(self) -> int:
        """Requests submitted and not yet in a row."""
        return self.engine.core.metrics()["waiting"]

    def submit(self, row: Row, timeout_s: float | None = None) -> Pending:
        """Submit `row` (raises `QueueFullError` when `max_pending` requests already wait)."""
        pending = Pending(row)
        if self.pending() >= self.max_pending:
            self.metrics.count("rejected_queue_full")
            raise QueueFullError(
                f"{self.pending()} requests are already waiting (max_pending={self.max_pending}); "
                "retry later or start the server with a larger --max-pending."
            )
        try:
            handle = self.engine.core.submit(self.engine.request(row, timeout_s))
        except (EngineQueueFull, EngineStoppedError) as err:
            self.metrics.count("rejected_queue_full")
            raise QueueFullError(f"{err} Retry later.") from None
        except Exception:
            self.metrics.count("rejected_invalid")
            raise
        pending.handle = handle
        handle.future.add_done_callback(lambda f: self._done(pending, f))
        return pending

    def cancel(self, pending: Pending) -> None:
        """End `pending` at the next iteration (client gone or timed out), freeing its row."""
        if pending.handle is not None:
            self.engine.core.cancel(pending.handle)

    def _done(self, pending: Pending, future: concurrent.futures.Future) -> None:
        error = future.exception()
        if error is not None:
            self.metrics.count("batch_errors")
            _settle(pending.future, error=error)
            return
        result: Result = future.result()
        queue_s = result.queue_s if result.queue_s is not None else result.total_s
        if result.finish_reason in ("cancelled", "timeout"):
            self.metrics.count("cancelled" if result.finish_reason == "cancelled" else "timed_out")
            words = "was cancelled" if result.finish_reason == "cancelled" else "timed out"
            _settle(
                pending.future,
                error=RequestTimeoutError(
                    f"the request {words} after {result.total_s:.3f} s "
                    f"({len(result.tokens)} tokens generated); retry with a larger `timeout` "
                    "or when the server is less busy."
                ),
            )
            return
        adapters = result.adapters or (pending.row.adapter,)
        info = BatchInfo(
            result.batch,
            max(result.live_rows, 1),
            self.engine.config.rows,
            sum(result.prefill_chunks),
            adapters,
        )
        with self._lock:  # one batch per engine iteration that started requests together
            new = result.batch not in self._batches
            self._batches[result.batch] = None
            while len(self._batches) > 4096:
                self._batches.pop(next(iter(self._batches)))
        if new:
            self.metrics.record_batch(info.rows, info.padded_rows, len(adapters), [queue_s])
        # the request's share of the engine's time: its rows shared each step with the others
        share = (result.total_s - queue_s) / max(result.live_rows, 1)
        self.metrics.record_tokens(len(result.tokens), share)
        _settle(pending.future, Served(self.engine.row_result(result), info, queue_s))
