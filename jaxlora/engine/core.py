"""The engine: continuous batching over a fixed row pool (spec `specs/engine.md`).

`Engine.submit(request)` returns a `Handle` at once; the requests are served by *iterations*,
each run by `Engine.step()` (on the engine's own thread after `start()`, or inline by
`run_until_done()`):

1. new submissions join the waiting queue; cancelled and timed-out requests end, freeing
   their rows (SW-ENGINE-8);
2. free rows take waiting requests in arrival order; a request whose adapter is not on the
   device gets a slot from the LRU (`jaxlora.engine.adapters`), or keeps waiting without
   holding back the requests behind it (SW-ENGINE-7);
3. one prefill call writes the next chunk of up to `prefill_rows(c)` admitted prompts (the
   oldest first, those whose next chunk has the same size `c`); a prompt that ends gets its
   first token;
4. one decode call gives every decoding row its next token, or its next `n` tokens
   (`EngineConfig.steps_for`: several steps per call when no prompt is being prefilled);
   rows that stop or reach their limit are freed (SW-ENGINE-1).

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
    >>> engine = Engine(model, EngineConfig(rows=2, max_len=16, chunks=(8,), slots=1, rank=2))
    >>> handle = engine.submit(Request((1, 2, 3), max_new_tokens=4))
    >>> engine.run_until_done(); len(handle.result().tokens)
    4
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import AdapterNotFoundError, ConfigError, format_names
from ..lora import check_selection
from ..models.llama import Llama, init_cache
from ..sharding import to_host
from ..types import NO_ADAPTER, Active, Adapter, LoraSelection, Routed, StackedBank
from . import steps
from .adapters import AdapterStore, SlotCache, empty_bank, swap_in
from .config import EngineConfig
from .errors import EngineStoppedError, QueueFullError
from .pool import Pool
from .request import Handle, Request, Result, check_request

__all__ = ["Engine"]

_log = logging.getLogger(__name__)


class Engine:
    """A model, a row pool with its KV cache, device adapter slots and a request queue.

    Arguments:
        model: the decoder.
        config: the fixed sizes (`EngineConfig`).
        bank: a caller's `StackedBank`, every slot resident for good; requests name its
            slots. Without `bank` (and `lora`), the engine holds a host `AdapterStore` and
            `config.slots` device slots (add adapters with `add_adapter`).
        lora: one fixed selection for every request (`jaxlora.select(...)`, one adapter);
            requests then name no adapter.
        adapters: adapters to add to the store at once (`name -> adapter`).
        max_adapters: the most adapters the store holds (None: no limit).
        detokenize: `ids -> str`, needed for requests with `stop_strings`.
    """

    def __init__(
        self,
        model: Llama,
        config: EngineConfig | None = None,
        *,
        bank: StackedBank | None = None,
        lora: LoraSelection = None,
        adapters: Mapping[str, Adapter] | None = None,
        max_adapters: int | None = None,
        detokenize: Any = None,
    ):
        self.model, self.config = model, config or EngineConfig()
        cfg = self.config
        shapes = model.lora_shapes()
        self._graphdef, self._state = nnx.split(model)
        self.steps = steps.for_model(self._graphdef)
        self._fixed: Active | None = None
        self.store: AdapterStore | None = None
        if lora is not None and bank is not None:
            raise ConfigError("give the engine `bank=` or `lora=`, not both.")
        if lora is not None:
            sel = check_selection(lora, shapes)
            if isinstance(sel, Routed):
                raise ConfigError(
                    "Engine(lora=) takes one selection for every row; for per-request adapters "
                    "pass the stacked bank as `bank=` and name a slot in each Request."
                )
            self._fixed, self._bank, slots = sel, None, SlotCache(0)
        elif bank is not None:
            ids = jnp.zeros((1,), jnp.int32)
            check_selection(
                Routed(bank, ids), shapes, batch=1
            )  # raises for a bank that does not fit
            self._bank = bank
            slots = SlotCache(len(bank.names), fixed=[(n, 0) for n in bank.names])
        elif cfg.slots == 0:  # the base model only
            self._bank, slots = None, SlotCache(0)
        else:
            targets = sorted(shapes) if cfg.targets is None else list(cfg.targets)
            self._bank = empty_bank(shapes, cfg.slots, cfg.rank, targets, model.dtype)
            self.store = AdapterStore(self._bank, max_adapters)
            slots = SlotCache(cfg.slots)
        self.slots = slots
        self._cache = init_cache(
            model.config, cfg.rows, cfg.max_len, cfg.cache_dtype_for(model.dtype)
        )
        self.pool = Pool(cfg.rows, cfg.stop_width)
        self._detokenize = detokenize
        self._cond = threading.Condition()
        self._inbox: list[Handle] = []
        self._dropped: list[tuple[str, int]] = []
        self._waiting: collections.deque[Handle] = collections.deque()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._paused = 0
        self._counts = collections.Counter()
        self._compiles = {"decode": 0, "prefill": 0}
        self._seconds = {"decode": 0.0, "prefill": 0.0}
        for name, adapter in (adapters or {}).items():
            self.add_adapter(name, adapter)

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(self, name: str, adapter: Adapter, source: str | None = None) -> int:
        """Add `adapter` to the host store (any thread); returns its version. Nothing is
        compiled; it reaches a device slot when a request first needs it."""
        if self.store is None:
            raise ConfigError(
                "this engine serves a fixed bank or selection, or has no adapter slots; build "
                "it without `bank=` / `lora=` and with EngineConfig(slots=N > 0) to add "
                "adapters at run time."
            )
        return self.store.add(name, adapter, source)

    def remove_adapter(self, name: str) -> None:
        """Remove `name` from the store; running requests finish with it, waiting ones fail."""
        if self.store is None:
            raise AdapterNotFoundError(f"no adapter named {name!r} can be removed: fixed bank.")
        version = self.store.remove(name)
        with self._cond:
            self._dropped.append((name, version))
            self._cond.notify_all()

    def adapter_names(self) -> list[str]:
        """The adapters requests may name."""
        if self.store is not None:
            return self.store.names()
        return [] if self._bank is None else list(self._bank.names)

    def _knows(self, name: str) -> bool:
        if self.store is not None:
            return name in self.store
        return self._bank is not None and name in self._bank.names

    # -- requests ---------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raise the error `submit` would raise for `request` (nothing is queued)."""
        cfg = self.config
        check_request(
            request,
            self.model.config.vocab_size,
            cfg.max_len,
            cfg.stop_width,
            detokenize=self._detokenize is not None,
        )
        if request.adapter is not None and not self._knows(request.adapter):
            raise AdapterNotFoundError(
                f"no adapter named {request.adapter!r} is loaded. Loaded: "
                f"{format_names(self.adapter_names())} (None: the base model)."
            )

    def submit(self, request: Request) -> Handle:
        """Queue `request` (any thread); returns its `Handle`. Raises for a request the engine
        cannot serve (see `check`) and `QueueFullError` when `max_waiting` already wait."""
        self.check(request)
        handle = Handle(request)
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is stopping; it takes no new requests.")
            if len(self._inbox) + len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"{self.config.max_waiting} requests already wait for a row (max_waiting); "
                    "retry later."
                )
            self._inbox.append(handle)
            self._cond.notify_all()
        return handle

    def cancel(self, handle: Handle) -> None:
        """End `handle` with reason "cancelled" at the next iteration (its row is freed)."""
        handle.cancel_requested = True
        with self._cond:
            self._cond.notify_all()

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Submit `requests`, run until all end (no thread), return their results in order."""
        handles = [self.submit(r) for r in requests]
        self.run_until_done()
        return [h.result() for h in handles]

    # -- running ----------------------------------------------------------------------------
    def busy(self) -> bool:
        """Whether any request is submitted, waiting or in a row."""
        with self._cond:
            return bool(self._inbox or self._waiting or self._dropped) or self.pool.occupied()

    def run_until_done(self) -> None:
        """Run iterations on this thread until no request is left (not with `start()`)."""
        if self._thread is not None:
            raise ConfigError("the engine runs on its own thread; wait on the handles instead.")
        while self.busy():
            self.step()

    def start(self) -> Engine:
        """Run iterations on a background thread from now on (until `stop()`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="jaxlora-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread; requests not finished fail with `EngineStoppedError`. The engine
        (its cache, slots and store) stays usable: `start()` again or step it inline."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        error = EngineStoppedError("the engine was stopped before the request ended.")
        with self._cond:
            ended = [*self._inbox, *self._waiting]
            self._inbox.clear()
            self._waiting.clear()
            self._thread, self._stopping = None, False
        for i, row in self.pool.items():
            if row.slot != NO_ADAPTER:
                self.slots.unpin(row.slot)
            self.pool.release(i)
            ended.append(row.handle)
        for handle in ended:
            handle._fail(error)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While held, the engine's thread runs no iteration (submissions wait, timeouts keep
        counting); e.g. to drain, or to fill the queue deterministically in a test."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not self.busy()):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a failed iteration fails its requests, not the thread
                _log.exception("engine iteration failed")
                for handle in [*self._waiting, *self.pool.handles()]:
                    handle._fail(err)
                self._waiting.clear()
                self.pool.clear()
                self._counts["failed_iterations"] += 1

    # -- one iteration ----------------------------------------------------------------------
    def step(self) -> None:
        """One iteration: admit, one prefill call, one decode step (see the module docstring)."""
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            dropped, self._dropped = self._dropped, []
        for key in dropped:
            self.slots.drop(key)
        self._counts["iterations"] += 1
        self._expire(time.monotonic())
        self._admit()
        self._prefill()
        self._decode()

    def _expire(self, now: float) -> None:
        keep: collections.deque[Handle] = collections.deque()
        for h in self._waiting:
            reason = _ended(h, now)
            if reason:
                self._counts[reason] += 1
                h._finish(reason)
            else:
                keep.append(h)
        self._waiting = keep
        for i, row in self.pool.items():
            reason = _ended(row.handle, now)
            if reason:
                self._counts[reason] += 1
                self._free(i, reason)

    def _free(self, i: int, reason: str, stop: int | str | None = None) -> None:
        row = self.pool.release(i)
        if row.slot != NO_ADAPTER:
            self.slots.unpin(row.slot)
        row.handle._finish(reason, stop)

    def _admit(self) -> None:
        kept: collections.deque[Handle] = collections.deque()
        while self._waiting and self.pool.free():
            h = self._waiting.popleft()
            try:
                slot = self._slot_for(h)
            except AdapterNotFoundError as err:
                h._fail(err)
                continue
            if slot is None:  # every slot is pinned: wait, let the next requests pass
                kept.append(h)
                continue
            self.pool.place(
                h, slot, self.config.chunk_plan(len(h.request.tokens)), next(self._order)
            )
        kept.extend(self._waiting)
        self._waiting = kept

    def _slot_for(self, h: Handle) -> int | None:
        name = h.request.adapter
        if name is None:
            return NO_ADAPTER
        if self.store is None:
            key = (name, 0)
        else:
            version = self.store.version(name)
            if version is None:
                raise AdapterNotFoundError(
                    f"adapter {name!r} was unloaded before the request ran. Loaded: "
                    f"{format_names(self.store.names())}."
                )
            key = (name, version)
        first = "looked_up" not in h.info
        h.info["looked_up"] = True
        slot = self.slots.resident.get(key)
        if slot is not None:
            self.slots.stats.hits += first
        else:
            self.slots.stats.misses += first
            slot = self.slots.victim()
            if slot is None:
                return None
            self._swap_in(key, slot)
        self.slots.pin(slot)
        return slot

    def _swap_in(self, key: tuple[str, int], slot: int) -> None:
        assert self._bank is not None and self.store is not None
        self._bank = swap_in(self.slots, self.store, self._bank, key, slot)

    def _run(self, fn, kind: str, *args, **static):
        before, start = fn._cache_size(), time.perf_counter()
        out = fn(
            self._state,
            self._cache,
            self._bank,
            self._fixed,
            *args,
            routing=self.config.routing,
            **static,
        )
        self._compiles[kind] += fn._cache_size() - before
        *out, self._cache = out
        out = [to_host(x) for x in out]  # the whole value, also when rows span processes
        self._seconds[kind] += time.perf_counter() - start
        return out

    def _prefill(self) -> None:
        batch = self.pool.prefill_batch(self.config)
        if batch is None:
            return
        group, tokens, ints, floats = batch
        first, logprobs = self._run(self.steps.prefill, "prefill", tokens, ints, floats)
        self._counts["prefill_calls"] += 1
        for j, i in enumerate(group):
            if self.pool.advance(i, int(ints[j, 2])):
                self._emit(i, int(first[j]), float(logprobs[j]))

    def _decode(self) -> None:
        live = self.pool.decoding()
        if not live:
            return
        with self._cond:
            waiting = bool(self._inbox or self._waiting)
        left = max(self.pool.left(i) for i in live)
        n, until_end = self.config.steps_for(self.pool.prefilling(), waiting, left)
        ints, floats = self.pool.decode_arrays()
        control = np.asarray([n, until_end], np.int32)
        tokens, logprobs, done = self._run(
            self.steps.decode, "decode", ints, floats, control, block=self.config.decode_steps
        )
        self._counts["decode_calls"] += 1
        rows = {i: self.pool.row(i) for i in live}
        for s in range(int(done)):
            rows = {i: r for i, r in rows.items() if self.pool.get(i) is r}
            if not rows:
                break
            self._counts["decode_steps"] += 1
            self._counts["live_row_steps"] += len(rows)
            names = {r.handle.request.adapter for r in rows.values()}
            adapters = tuple(sorted(names, key=lambda a: (a is not None, a or "")))
            for i, r in rows.items():
                h = r.handle
                h.info["steps"] += 1
                if h.info["steps"] == 1:
                    h.info["live_rows"], h.info["adapters"] = len(rows), adapters
                self._emit(i, int(tokens[s, i]), float(logprobs[s, i]))

    def _emit(self, i: int, token: int, logprob: float) -> None:
        row = self.pool.row(i)
        h, request = row.handle, row.handle.request
        if "first" not in h.info:
            h.info["first"] = time.monotonic()
            h.info["batch"] = self._counts["iterations"]
        h._emit(token, logprob)
        self._counts["tokens"] += 1
        n = len(h._tokens)
        if token in request.stop_tokens:
            self._free(i, "stop", token)
        elif request.stop_strings and (hit := self._stop_string(h)) is not None:
            self._free(i, "stop", hit)
        elif n >= request.max_new_tokens:
            self._free(i, "length")
        else:
            self.pool.next_token(i, token, len(request.tokens) + n - 1, n)

    def _stop_string(self, h: Handle) -> str | None:
        text = self._detokenize(list(h._tokens))
        return next((s for s in h.request.stop_strings if s in text), None)

    # -- introspection ----------------------------------------------------------------------
    def compile_counts(self) -> dict[str, int]:
        """Executables this engine's calls compiled: `{"decode": n, "prefill": n}`."""
        return dict(self._compiles)

    def metrics(self) -> dict[str, Any]:
        """Counters: iterations, steps, tokens, rows, queue, adapter slots, compiles."""
        c = self._counts
        stats = self.slots.stats
        with self._cond:
            waiting = len(self._inbox) + len(self._waiting)
        return {
            "iterations": c["iterations"],
            "decode_steps": c["decode_steps"],
            "decode_calls": c["decode_calls"],
            "prefill_calls": c["prefill_calls"],
            "tokens": c["tokens"],
            "mean_live_rows": c["live_row_steps"] / max(c["decode_steps"], 1),
            "rows": {"total": self.config.rows, "occupied": len(self.pool.items())},
            "waiting": waiting,
            "ended": {r: c[r] for r in ("cancelled", "timeout")},
            "adapters": {
                "hits": stats.hits,
                "misses": stats.misses,
                "swap_ins": stats.swap_ins,
                "evictions": stats.evictions,
                "swap_in_seconds": stats.swap_in_seconds,
                "pinned_slots": len(self.slots.pinned()),
            },
            "compiles": self.compile_counts(),
            "seconds": dict(self._seconds),  # in the calls, results read back (compiles too)
        }

    def warmup(self) -> None:
        """Compile the decode step, every prefill chunk and the slot write now (before
        `start()`): one base request per chunk size, one on a stored adapter."""
        for c in self.config.chunks:
            n = max(1, min(c, self.config.max_len - 2))
            self.generate([Request((0,) * n, max_new_tokens=2)])
        names = self.store.names() if self.store is not None else []
        if names:
            self.generate([Request((0,), max_new_tokens=1, adapter=names[0])])


def _ended(h: Handle, now: float) -> str | None:
    if h.cancel_requested:
        return "cancelled"
    t = h.request.timeout_s
    if t is not None and now - h.submitted > t:
        return "timeout"
    return None
