"""The static-batch server that continuous batching replaced (kept for `serving_engine` only).

The seed's serving engine and scheduler, unchanged but for imports: the scheduler gathers the
requests pending within a window into one padded batch and runs it to completion with one
jitted prefill + `lax.while_loop` decode (every row waits for the batch's longest); new
requests wait for the running batch. It runs on today's model code (so it benefits from the
in-place KV cache too); `benchmarks.serving_engine` measures it next to the engine in the same
run. Not part of jaxlora: never imported outside the benchmark.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import AdapterExistsError, AdapterNotFoundError, ConfigError, format_names
from jaxlora.models.llama import Llama, init_cache
from jaxlora.serve.errors import (
    NoFreeSlotError,
    QueueFullError,
    RequestTimeoutError,
    RequestTooLargeError,
)
from jaxlora.serve.metrics import Metrics
from jaxlora.slots import replace_slot
from jaxlora.types import NO_ADAPTER, Adapter, LoraWeights, Routed, StackedBank

#: The name that means "no adapter" (the base model) in requests, splits and fallback chains.
BASE = "base"


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The static shapes a batch is padded to (each combination compiles once).

    Arguments:
        batch_sizes: row counts a batch is padded to, ascending; the largest is the most rows
            one batch takes.
        prompt_lengths: prompt lengths a batch is left-padded to, ascending; the largest is the
            longest prompt accepted (longer: 413).
        max_new_tokens: the most tokens a request may ask for (more: 413).
        stop_width: the most stop tokens a request may give.
    """

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_lengths: tuple[int, ...] = (16, 64, 256)
    max_new_tokens: int = 64
    stop_width: int = 4

    def __post_init__(self) -> None:
        for field in ("batch_sizes", "prompt_lengths"):
            values = tuple(getattr(self, field))
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ConfigError(
                    f"Buckets.{field} must be distinct positive ints in ascending order, got "
                    f"{values!r}; e.g. (1, 8, 32)."
                )
            object.__setattr__(self, field, values)
        if self.max_new_tokens < 1 or self.stop_width < 1:
            raise ConfigError(
                f"Buckets.max_new_tokens ({self.max_new_tokens}) and stop_width "
                f"({self.stop_width}) must be positive."
            )

    def fit(self, values: Sequence[int], n: int, what: str) -> int:
        """The smallest bucket >= n, or `RequestTooLargeError` naming the limit."""
        for v in values:
            if n <= v:
                return v
        raise RequestTooLargeError(f"{what} is {n}, above this server's limit of {values[-1]}.")


@dataclasses.dataclass(frozen=True)
class Row:
    """One request as the engine sees it (validated by the HTTP layer).

    `adapter` is a loaded adapter's name or None (base); `temperature` 0 is greedy; `top_k` 0
    means no top-k filter; `seed` feeds the row's own PRNG stream.
    """

    tokens: tuple[int, ...]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class RowResult:
    """Generated tokens (stop token included), their log-probabilities and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"


class Snapshot(NamedTuple):
    """The bank and `adapter name -> slot` at one instant (what a batch runs against)."""

    stacked: StackedBank
    slots: Mapping[str, int]


class _RowArrays(NamedTuple):
    ids: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    seeds: jax.Array
    stop: jax.Array


def _pick(logits, rows: _RowArrays, step):
    """Per-row next token: argmax, or a sample under the row's temperature/top-k/seed stream."""
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)
    kth = jnp.take_along_axis(ordered, jnp.clip(rows.top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    keep = (rows.top_k[:, None] <= 0) | (logits >= kth)
    scaled = jnp.where(keep, logits, -jnp.inf) / jnp.maximum(rows.temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(rows.seeds)
    sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    token = jnp.where(rows.temperature > 0, sampled, greedy)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def _generate_batch(graphdef, state, stacked, tokens, mask, rows: _RowArrays, max_new, pad_id):
    """Prefill + decode loop for one padded batch; returns `(tokens, logprobs)` `[B, max_new]`."""
    model = nnx.merge(graphdef, state)
    batch, length = tokens.shape
    lora = Routed(stacked, rows.ids)  # already canonical: the engine builds its own ids
    cache = init_cache(model.config, batch, length + max_new, model.dtype)
    logits, cache = model.run(tokens, cache, mask, lora, "auto")
    out = jnp.full((batch, max_new), pad_id, jnp.int32)
    logps = jnp.zeros((batch, max_new), jnp.float32)

    def emit(step, logits, done, out, logps):
        token, logp = _pick(logits, rows, step)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        stopped = jnp.any((token[:, None] == rows.stop) & (rows.stop >= 0), axis=-1)
        done = done | stopped | (step + 1 >= rows.max_new)
        return token, done, out, logps

    token, done, out, logps = emit(0, logits[:, -1], jnp.zeros((batch,), bool), out, logps)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, out, logps = carry
        ones = jnp.ones((batch, 1), bool)
        logits, cache = model.run(token[:, None], cache, ones, lora, "auto")
        token, done, out, logps = emit(step, logits[:, 0], done, out, logps)
        return step + 1, token, cache, done, out, logps

    carry = (jnp.asarray(1, jnp.int32), token, cache, done, out, logps)
    _, _, _, _, out, logps = jax.lax.while_loop(cond, body, carry)
    return out, logps


def _empty_bank(model: Llama, capacity: int, rank: int, targets: Sequence[str]) -> StackedBank:
    shapes = model.lora_shapes()
    weights = {
        path: LoraWeights(
            jnp.zeros((capacity, shapes[path][0], rank), jnp.float32),
            jnp.zeros((capacity, rank, shapes[path][1]), jnp.float32),
            jnp.zeros((capacity,), jnp.float32),
        )
        for path in targets
    }
    return StackedBank(weights, tuple(f"slot{i}" for i in range(capacity)))


class Engine:
    """A model plus a fixed-capacity adapter bank; thread-safe load/unload, batched generation.

    Arguments:
        model: the decoder.
        capacity: the number of adapter slots.
        rank: the bank's rank (adapters of rank <= this load without recompiling).
        targets: the layer paths the bank holds (default: every projection of the model).
        buckets: the static shapes batches are padded to.
        pad_id: the padding token id.
    """

    def __init__(
        self,
        model: Llama,
        *,
        capacity: int = 8,
        rank: int = 8,
        targets: Sequence[str] | None = None,
        buckets: Buckets | None = None,
        pad_id: int = 0,
    ):
        shapes = model.lora_shapes()
        targets = sorted(shapes) if targets is None else list(targets)
        unknown = [t for t in targets if t not in shapes]
        if capacity < 1 or rank < 1 or unknown or not targets:
            raise ConfigError(
                f"Engine: capacity ({capacity}) and rank ({rank}) must be positive and targets "
                f"must be projections of the model; unknown: {format_names(unknown)}; "
                f"projections: {format_names(shapes, 8)}."
            )
        self.model, self.buckets, self.pad_id = model, buckets or Buckets(), pad_id
        self.capacity, self.rank, self.targets = capacity, rank, tuple(targets)
        self._graphdef, self._state = nnx.split(model)

        # A function object of its own per engine: jit caches per function, so compile_count()
        # then counts this engine's compilations only (not other engines' in the process).
        def generate_batch(*args, **kwargs):
            return _generate_batch(*args, **kwargs)

        self._generate_batch = jax.jit(
            generate_batch, static_argnames=("graphdef", "max_new", "pad_id")
        )
        self._lock = threading.Lock()
        self._stacked = _empty_bank(model, capacity, rank, targets)
        self._slots: dict[str, int] = {}
        self._sources: dict[str, str | None] = {}

    # -- adapters ---------------------------------------------------------------------------
    def load(self, name: str, adapter: Adapter, source: str | None = None) -> int:
        """Write `adapter` into a free slot under `name`; returns the slot (no retrace)."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ConfigError(f"adapter name {name!r} is invalid; {BASE!r} means the base model.")
        with self._lock:
            if name in self._slots:
                raise AdapterExistsError(
                    f"adapter {name!r} is already loaded (slot {self._slots[name]}); DELETE "
                    f"/adapters/{name} first to replace it."
                )
            free = sorted(set(range(self.capacity)) - set(self._slots.values()))
            if not free:
                raise NoFreeSlotError(
                    f"cannot load {name!r}: all {self.capacity} slots are in use "
                    f"({format_names(self._slots)}); unload one or start with a larger capacity."
                )
            self._stacked = replace_slot(
                self._stacked, free[0], adapter, donate=False
            )  # raises (writing nothing) when the adapter does not fit
            self._slots[name] = free[0]
            self._sources[name] = source
            return free[0]

    def unload(self, name: str) -> int:
        """Free the slot of `name` (its weights are left in place, unused); returns the slot."""
        with self._lock:
            if name not in self._slots:
                raise AdapterNotFoundError(
                    f"no adapter named {name!r} is loaded. Loaded: {format_names(self._slots)}."
                )
            self._sources.pop(name)
            return self._slots.pop(name)

    def adapters(self) -> dict[str, dict[str, Any]]:
        """`name -> {"slot", "source"}` of the loaded adapters."""
        with self._lock:
            return {n: {"slot": s, "source": self._sources[n]} for n, s in self._slots.items()}

    def snapshot(self) -> Snapshot:
        """The current bank and slot map; a batch run against it is unaffected by later loads."""
        with self._lock:
            return Snapshot(self._stacked, dict(self._slots))

    # -- generation -------------------------------------------------------------------------
    def check(self, row: Row) -> None:
        """Raise `RequestTooLargeError` / `ConfigError` for a row this engine cannot serve."""
        b = self.buckets
        b.fit(b.prompt_lengths, len(row.tokens), "the prompt length")
        if row.max_new_tokens > b.max_new_tokens:
            raise RequestTooLargeError(
                f"max_new_tokens is {row.max_new_tokens}, above this server's limit of "
                f"{b.max_new_tokens}."
            )
        if len(row.stop) > b.stop_width:
            raise ConfigError(f"at most {b.stop_width} stop tokens, got {len(row.stop)}.")
        vocab = self.model.config.vocab_size
        bad = [t for t in (*row.tokens, *row.stop) if not 0 <= t < vocab]
        if not row.tokens or bad or row.max_new_tokens < 1:
            raise ConfigError(
                f"token ids must be in [0, {vocab}) (got {bad[:5]}), the prompt non-empty and "
                f"max_new_tokens >= 1 (got {row.max_new_tokens})."
            )
        if not 0 <= row.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32) (got {row.seed}); use a 32-bit seed.")
        if row.temperature < 0 or not 0 <= row.top_k <= vocab:
            raise ConfigError(
                f"temperature must be >= 0 (got {row.temperature}) and top_k in [0, {vocab}] "
                f"(got {row.top_k})."
            )

    def padded_shape(self, rows: int, longest_prompt: int) -> tuple[int, int]:
        """The `(batch, prompt length)` bucket a batch of this size is padded to."""
        b = self.buckets
        return (
            b.fit(b.batch_sizes, rows, "the batch size"),
            b.fit(b.prompt_lengths, longest_prompt, "the prompt length"),
        )

    def run(self, rows: Sequence[Row], snapshot: Snapshot) -> list[RowResult]:
        """Generate every row in one padded mixed batch against `snapshot`.

        Raises `AdapterNotFoundError` when a row names an adapter the snapshot lacks.
        """
        for row in rows:
            if row.adapter is not None and row.adapter not in snapshot.slots:
                raise AdapterNotFoundError(
                    f"no adapter named {row.adapter!r} is loaded. Loaded: "
                    f"{format_names(snapshot.slots)}."
                )
        batch, length = self.padded_shape(len(rows), max(len(r.tokens) for r in rows))
        tokens = np.full((batch, length), self.pad_id, np.int32)
        mask = np.zeros((batch, length), bool)
        tokens[:, -1], mask[:, -1] = self.pad_id, True  # filler rows: one token, base model
        stop = np.full((batch, self.buckets.stop_width), -1, np.int32)
        ids = np.full((batch,), NO_ADAPTER, np.int32)
        max_new, temp = np.ones((batch,), np.int32), np.zeros((batch,), np.float32)
        top_k, seeds = np.zeros((batch,), np.int32), np.zeros((batch,), np.uint32)
        for i, r in enumerate(rows):
            n = len(r.tokens)
            tokens[i, length - n :], mask[i, length - n :] = r.tokens, True
            mask[i, : length - n] = False
            stop[i, : len(r.stop)] = r.stop
            ids[i] = NO_ADAPTER if r.adapter is None else snapshot.slots[r.adapter]
            max_new[i], temp[i], top_k[i], seeds[i] = (
                r.max_new_tokens,
                r.temperature,
                r.top_k,
                r.seed,
            )
        arrays = _RowArrays(*map(jnp.asarray, (ids, max_new, temp, top_k, seeds, stop)))
        out, logps = self._generate_batch(
            self._graphdef,
            self._state,
            snapshot.stacked,
            jnp.asarray(tokens),
            jnp.asarray(mask),
            arrays,
            max_new=self.buckets.max_new_tokens,
            pad_id=self.pad_id,
        )
        out, logps = np.asarray(out), np.asarray(logps)
        return [_trim(out[i], logps[i], r) for i, r in enumerate(rows)]

    def compile_count(self) -> int:
        """Executables compiled for batch generation so far (bounded by the buckets)."""
        return self._generate_batch._cache_size()

    def warmup(self) -> None:
        """Compile every (batch size, prompt length) bucket now instead of on first use."""
        snap = self.snapshot()
        for batch in self.buckets.batch_sizes:
            for length in self.buckets.prompt_lengths:
                self.run([Row((0,) * length, None, 1)] * batch, snap)


def _trim(tokens: np.ndarray, logps: np.ndarray, row: Row) -> RowResult:
    out: list[int] = []
    for t in tokens[: row.max_new_tokens].tolist():
        out.append(t)
        if t in row.stop:
            return RowResult(out, logps[: len(out)].tolist(), "stop")
    return RowResult(out, logps[: len(out)].tolist(), "length")


# ---- the static scheduler ------------------------------------------------------------


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
