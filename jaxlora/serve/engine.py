"""The serving engine: `jaxlora.engine` with the HTTP layer's names for requests and results.

The server runs one `jaxlora.engine.Engine` (continuous batching, spec `specs/engine.md`):
a fixed pool of rows decoded together step by step, prompts prefilled in chunks between steps,
finished rows refilled at once. Adapters live in the engine's host store (any number); the
engine's device slots hold the ones requests need (LRU, pinned while in use): loading or
unloading an adapter never recompiles (SW-SERVE-4, SW-ENGINE-7). This module maps the HTTP
layer's `Row` to an engine `Request` and its `Result` back to a `RowResult`, and checks a row
against the server's limits with the errors the HTTP layer answers (413, 400).

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
    >>> engine = Engine(model, capacity=2, rank=4, buckets=Buckets((1, 4), (8,), 4))
    >>> engine.config.rows, engine.config.max_len, engine.config.chunks
    (4, 12, (8,))
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..engine import Engine as CoreEngine
from ..engine import EngineConfig, Request, Result, SamplingParams
from ..errors import ConfigError
from ..models.llama import Llama
from .errors import RequestTooLargeError

__all__ = ["BASE", "Buckets", "Engine", "Row", "RowResult"]

#: The name that means "no adapter" (the base model) in requests, splits and fallback chains.
BASE = "base"


@dataclasses.dataclass(frozen=True)
class Buckets:
    """The server's limits, as `jaxlora serve` takes them (mapped to an `EngineConfig`).

    Arguments:
        batch_sizes: the largest is the number of rows decoded together (the row pool).
        prompt_lengths: the prefill chunk sizes; the largest is the longest prompt accepted.
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

    def config(self, slots: int, rank: int, targets: Sequence[str] | None) -> EngineConfig:
        """The `EngineConfig`: rows = the largest batch size, chunks = the prompt lengths,
        `max_len` = the longest prompt + `max_new_tokens`."""
        return EngineConfig(
            rows=self.batch_sizes[-1],
            max_len=self.prompt_lengths[-1] + self.max_new_tokens,
            chunks=self.prompt_lengths,
            prefill_tokens=max(256, self.prompt_lengths[-1]),
            slots=slots,
            rank=rank,
            targets=None if targets is None else tuple(targets),
            stop_width=self.stop_width,
        )


@dataclasses.dataclass(frozen=True)
class Row:
    """One request as the HTTP layer parsed it.

    `adapter` is a loaded adapter's name or None (base); `temperature` 0 is greedy; `top_k` 0
    and `top_p` 1 mean no filter; `seed` feeds the row's own PRNG stream (SW-ENGINE-4).
    """

    tokens: tuple[int, ...]
    adapter: str | None
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[int, ...] = ()
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RowResult:
    """Generated tokens (stop token included), their log-probabilities and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"


class Engine:
    """The server's engine: a `jaxlora.engine.Engine` plus the HTTP layer's limits.

    Arguments:
        model: the decoder.
        capacity: device adapter slots (adapters beyond them wait on the host).
        rank: the slots' rank (adapters of rank <= this load without recompiling).
        targets: the layer paths the slots hold (default: every projection of the model).
        buckets: the limits (`Buckets`), when `config` is not given.
        config: the engine's sizes directly.
        max_adapters: the most adapters the host store holds (None: no limit).
        detokenize: `ids -> str`, for requests with stop strings.
    """

    def __init__(
        self,
        model: Llama,
        *,
        capacity: int = 8,
        rank: int = 8,
        targets: Sequence[str] | None = None,
        buckets: Buckets | None = None,
        config: EngineConfig | None = None,
        max_adapters: int | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        if capacity < 1 or rank < 1:
            raise ConfigError(f"Engine: capacity ({capacity}) and rank ({rank}) must be positive.")
        self.buckets = buckets or Buckets()
        if config is None:
            config = self.buckets.config(capacity, rank, targets)
        self.config = config
        self.core = CoreEngine(model, config, max_adapters=max_adapters, detokenize=detokenize)
        self.model = model
        self._sources: dict[str, str | None] = {}
        self._users = 0  # schedulers (servers) running on this engine
        self._lock = threading.Lock()

    def start(self) -> None:
        """Run the engine's thread (shared: several servers may run on one engine)."""
        with self._lock:
            self._users += 1
            if self._users == 1:
                self.core.start()

    def stop(self) -> None:
        """Stop the engine's thread when the last server using it stops."""
        with self._lock:
            self._users = max(self._users - 1, 0)
            if self._users == 0:
                self.core.stop()

    @property
    def capacity(self) -> int:
        """Device adapter slots."""
        return self.config.slots

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one request may ask for."""
        return min(self.buckets.max_new_tokens, self.config.max_len - 1)

    # -- adapters ---------------------------------------------------------------------------
    def load(self, name: str, adapter: Any, source: str | None = None) -> int:
        """Add `adapter` under `name` to the host store (no recompile); returns its version."""
        if not isinstance(name, str) or not name or name == BASE:
            raise ConfigError(f"adapter name {name!r} is invalid; {BASE!r} means the base model.")
        version = self.core.add_adapter(name, adapter, source)
        self._sources[name] = source
        return version

    def unload(self, name: str) -> int:
        """Remove `name`; rows using it finish with it, requests still waiting get 404."""
        if self.core.store is None or name not in self.core.store:
            from ..errors import AdapterNotFoundError, format_names

            raise AdapterNotFoundError(
                f"no adapter named {name!r} is loaded. Loaded: {format_names(self.adapters())}."
            )
        version = self.core.store.version(name) or 0
        self.core.remove_adapter(name)
        self._sources.pop(name, None)
        return version

    def adapters(self) -> dict[str, dict[str, Any]]:
        """`name -> {"slot": device slot or None (on the host), "source"}`."""
        store = self.core.store
        if store is None:
            return {}
        resident = {key[0]: slot for key, slot in list(self.core.slots.resident.items())}
        return {
            n: {"slot": resident.get(n), "source": i["source"]} for n, i in store.info().items()
        }

    # -- requests ---------------------------------------------------------------------------
    def request(self, row: Row, timeout_s: float | None = None) -> Request:
        """The engine `Request` of `row`."""
        sampling = SamplingParams(row.temperature, row.top_k, row.top_p, row.seed)
        return Request(
            row.tokens,
            row.max_new_tokens,
            row.adapter,
            sampling,
            row.stop,
            row.stop_strings,
            timeout_s,
        )

    def check(self, row: Row) -> None:
        """Raise `RequestTooLargeError` (413) / `ConfigError` (400) for a row the server
        cannot take, as `submit` would."""
        longest = self.config.max_len - self.buckets.max_new_tokens
        if len(row.tokens) > max(longest, 1):
            raise RequestTooLargeError(
                f"the prompt length is {len(row.tokens)}, above this server's limit of {longest}."
            )
        if row.max_new_tokens > self.buckets.max_new_tokens:
            raise RequestTooLargeError(
                f"max_new_tokens is {row.max_new_tokens}, above this server's limit of "
                f"{self.buckets.max_new_tokens}."
            )
        if len(row.stop) > self.config.stop_width:
            raise ConfigError(f"at most {self.config.stop_width} stop tokens, got {len(row.stop)}.")
        self.core.check(self.request(row))

    @staticmethod
    def row_result(result: Result) -> RowResult:
        return RowResult(result.tokens, result.logprobs, result.finish_reason)

    def compile_count(self) -> int:
        """Executables the engine compiled (bounded by `len(chunks) + 1`, SW-ENGINE-3)."""
        return sum(self.core.compile_counts().values())

    def warmup(self) -> None:
        """Compile the decode step and every prefill chunk now instead of on first use."""
        self.core.warmup()
