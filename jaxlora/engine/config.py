"""The engine's fixed sizes: row pool, cache length, prefill chunks, device adapter slots.

Everything the engine compiles is determined here (spec SW-ENGINE-3): one decode step for
`[rows]` tokens and one prefill call `[prefill_rows(c), c]` per chunk size `c`; nothing else
ever compiles, whatever the requests. Memory is fixed at start (SW-ENGINE-6): the KV cache
`cache_bytes` and the `slots` device adapter slots.

Prefill is *chunked*: a prompt is written in pieces of the configured chunk sizes (largest
first, the last piece the smallest chunk that holds the rest, see `chunk_plan`), one piece per
engine iteration, between decode steps. Chunking rather than one bucket per prompt length
bounds how long a decode step waits for a long prompt (a 500-token prompt never stalls the
rows decoding next to it for more than one chunk), keeps the compiled set small for any
prompt length up to `max_len`, and makes a request's arithmetic a function of its own length
only (its chunks have the same shapes alone or next to others: SW-ENGINE-2).

Example:
    >>> cfg = EngineConfig(rows=8, max_len=256, chunks=(16, 64), prefill_tokens=128)
    >>> cfg.chunk_plan(70), cfg.prefill_rows(16), cfg.prefill_rows(64)
    ((64, 16), 8, 2)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ..errors import ConfigError
from ..routing import ROUTINGS
from ..types import Routing

__all__ = ["EngineConfig"]


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The static shapes and capacities of an engine.

    Arguments:
        rows: sequences decoded together (the row pool); each owns one cache region.
        max_len: cache slots per row: the most `prompt + max_new_tokens` a request may have.
        chunks: prefill chunk sizes, ascending (each compiles once).
        prefill_tokens: tokens per prefill call: a call takes `max(1, prefill_tokens // c)`
            rows of chunk size `c`.
        slots: device adapter slots (an LRU cache over the engine's host adapter store); 0:
            the base model only, no LoRA computation at all.
        rank: the slots' LoRA rank; adapters of rank <= this load without recompiling.
        targets: the layer paths the slots hold (None: every projection of the model).
        cache_dtype: the KV cache dtype (None: the model's; e.g. "bfloat16" halves it).
        routing: the mixed-batch kernel (`jaxlora.routing`; "auto" chooses by shape).
        stop_width: the most stop tokens one request may give.
        max_waiting: the most submitted requests waiting for a row (more: `QueueFullError`).
        decode_steps: the most decode steps one iteration runs in one device call (`K`,
            see `steps_for`): more steps per call save the host round trip per token; a
            request submitted meanwhile waits at most that many steps for admission.
    """

    rows: int = 16
    max_len: int = 512
    chunks: tuple[int, ...] = (16, 64)
    prefill_tokens: int = 256
    slots: int = 8
    rank: int = 16
    targets: tuple[str, ...] | None = None
    cache_dtype: str | None = None
    routing: Routing = "auto"
    stop_width: int = 4
    max_waiting: int = 1024
    decode_steps: int = 1

    def __post_init__(self) -> None:
        chunks = tuple(self.chunks)
        object.__setattr__(self, "chunks", chunks)
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        ints = {
            "rows": self.rows,
            "max_len": self.max_len,
            "prefill_tokens": self.prefill_tokens,
            "rank": self.rank,
            "stop_width": self.stop_width,
            "max_waiting": self.max_waiting,
            "decode_steps": self.decode_steps,
        }
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or v < 1}
        if bad:
            raise ConfigError(f"EngineConfig: {bad} must be positive ints.")
        if not isinstance(self.slots, int) or self.slots < 0:
            raise ConfigError(f"EngineConfig.slots must be an int >= 0, got {self.slots!r}.")
        if not chunks or list(chunks) != sorted(set(chunks)) or chunks[0] < 1:
            raise ConfigError(
                f"EngineConfig.chunks must be distinct positive ints in ascending order, got "
                f"{chunks!r}; e.g. (16, 64)."
            )
        if chunks[-1] > self.max_len:
            raise ConfigError(
                f"EngineConfig: the largest chunk ({chunks[-1]}) exceeds max_len "
                f"({self.max_len}); use chunks <= max_len."
            )
        if self.routing not in ROUTINGS:
            raise ConfigError(f"EngineConfig.routing {self.routing!r}; choose one of {ROUTINGS}.")
        if self.cache_dtype is not None:
            try:
                jnp.dtype(self.cache_dtype)
            except TypeError:
                raise ConfigError(
                    f"EngineConfig.cache_dtype {self.cache_dtype!r} is not a dtype; use e.g. "
                    "'float32' or 'bfloat16'."
                ) from None

    def prefill_rows(self, chunk: int) -> int:
        """Rows one prefill call of chunk size `chunk` takes."""
        return max(1, self.prefill_tokens // chunk)

    def chunk_plan(self, n: int) -> tuple[int, ...]:
        """The chunk sizes a prompt of `n` tokens is prefilled with, in order (SW-ENGINE-2).

        The largest chunk while more than it remains, then the smallest chunk that holds the
        rest: a function of `n` alone.
        """
        plan: list[int] = []
        big = self.chunks[-1]
        while n > big:
            plan.append(big)
            n -= big
        plan.append(next(c for c in self.chunks if c >= n))
        return tuple(plan)

    def steps_for(self, prefilling: bool, waiting: bool, left: int) -> tuple[int, bool]:
        """`(n, until_end)` of the next decode call (spec SW-ENGINE-1): one step while a
        prompt is being prefilled; else `min(decode_steps, left)` steps (`left`: the most
        tokens a decoding row may still generate), ending after the first step in which a
        row ends when requests wait (`until_end`), so a waiting request never waits for a
        call to run past a free row.

        Example:
            >>> cfg = EngineConfig(decode_steps=8)
            >>> cfg.steps_for(True, False, 20), cfg.steps_for(False, True, 5)
            ((1, False), (5, True))
        """
        if prefilling:
            return 1, False
        return max(1, min(self.decode_steps, left)), waiting

    def cache_dtype_for(self, model_dtype: Any) -> Any:
        """The KV cache dtype for a model of `model_dtype`."""
        return jnp.dtype(model_dtype if self.cache_dtype is None else self.cache_dtype)

    def compiled_shapes(self) -> dict[str, tuple[int, int]]:
        """Every shape the engine compiles: `{"decode": (rows, 1), "prefill/c": (P, c)}`.

        Example:
            >>> EngineConfig(rows=4, chunks=(8,), prefill_tokens=16).compiled_shapes()
            {'decode': (4, 1), 'prefill/8': (2, 8)}
        """
        shapes = {"decode": (self.rows, 1)}
        for c in self.chunks:
            shapes[f"prefill/{c}"] = (self.prefill_rows(c), c)
        return shapes
