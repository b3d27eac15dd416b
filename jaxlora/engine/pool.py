"""The row pool's host-side state: which request holds each row and the per-row input arrays.

Row `i` of the pool is row `i` of the KV cache. Its decode inputs live in two NumPy arrays the
engine sends to the decode step whole (`jaxlora.engine.steps` documents the columns); a row
that is not decoding has position -1, so the step writes nothing for it and its output is
ignored. Used by the engine thread only.

Example:
    >>> from jaxlora.engine.request import Handle, Request
    >>> pool = Pool(2, stop_width=1)
    >>> i = pool.place(Handle(Request((5, 6, 7), 2)), -1, (4,), 0)
    >>> pool.free(), pool.decoding()
    ([1], [])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import EngineConfig
from .request import Handle
from .steps import DECODE_COLUMNS

__all__ = ["Pool", "Row"]


@dataclasses.dataclass(eq=False)
class Row:
    """A request in a row: its adapter slot, chunk plan, admission order and progress."""

    handle: Handle
    slot: int
    plan: tuple[int, ...]
    order: int
    written: int = 0  # prompt tokens in the cache
    chunk: int = 0  # index of the next chunk in `plan`
    decoding: bool = False


class Pool:
    """`rows` rows, each free or holding one request (of at most `stop_width` stop tokens)."""

    def __init__(self, rows: int, stop_width: int):
        self._rows: list[Row | None] = [None] * rows
        self.ints = np.zeros((rows, DECODE_COLUMNS + stop_width), np.int32)
        self.ints[:, 1:3] = -1  # not decoding; base model
        self.ints[:, DECODE_COLUMNS:] = -1  # no stop tokens
        self.floats = np.zeros((rows, 2), np.float32)

    def free(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is None]

    def occupied(self) -> bool:
        return any(r is not None for r in self._rows)

    def items(self) -> list[tuple[int, Row]]:
        return [(i, r) for i, r in enumerate(self._rows) if r is not None]

    def handles(self) -> list[Handle]:
        return [r.handle for _, r in self.items()]

    def row(self, i: int) -> Row:
        row = self._rows[i]
        assert row is not None
        return row

    def get(self, i: int) -> Row | None:
        return self._rows[i]

    def prefilling(self) -> bool:
        """Whether a row's prompt is not completely written yet."""
        return any(r is not None and not r.decoding for r in self._rows)

    def left(self, i: int) -> int:
        """Tokens row `i` may still generate."""
        return int(self.ints[i, 6])

    def clear(self) -> None:
        for i, _ in self.items():
            self.release(i)

    def place(self, handle: Handle, slot: int, plan: tuple[int, ...], order: int) -> int:
        """Put `handle` into the first free row (its prompt not yet written); returns the row."""
        i = self.free()[0]
        self._rows[i] = Row(handle, slot, plan, order)
        request = handle.request
        s = request.sampling
        seed = np.asarray(s.seed, np.uint32).view(np.int32)
        self.ints[i, :DECODE_COLUMNS] = (0, -1, slot, s.top_k, seed, 0, request.max_new_tokens)
        self.ints[i, DECODE_COLUMNS:] = -1
        self.ints[i, DECODE_COLUMNS : DECODE_COLUMNS + len(request.stop_tokens)] = (
            request.stop_tokens
        )
        self.floats[i] = (s.temperature, s.top_p)
        handle.info["chunks"] = plan
        handle.info["admitted"] = _now()
        return i

    def release(self, i: int) -> Row:
        row = self.row(i)
        self._rows[i] = None
        self.ints[i, 1:3] = -1
        return row

    def decoding(self) -> list[int]:
        return [i for i, r in enumerate(self._rows) if r is not None and r.decoding]

    def prefill_batch(self, config: EngineConfig):
        """`(rows, tokens [P, c], ints [P, 7], floats [P, 2])` for the next prefill call, or None.

        `c` is the next chunk size of the oldest row still prefilling; the call takes up to
        `P = config.prefill_rows(c)` such rows, oldest first; unused rows point at cache row
        `rows` (dropped).
        """
        waiting = sorted((r.order, i) for i, r in self.items() if not r.decoding)
        if not waiting:
            return None
        c = self.row(waiting[0][1]).plan[self.row(waiting[0][1]).chunk]
        p = config.prefill_rows(c)
        group = [i for _, i in waiting if self.row(i).plan[self.row(i).chunk] == c][:p]
        tokens = np.zeros((p, c), np.int32)
        ints = np.zeros((p, 7), np.int32)
        ints[:, 0], ints[:, 3] = len(self._rows), -1
        floats = np.zeros((p, 2), np.float32)
        for j, i in enumerate(group):
            row = self.row(i)
            prompt = row.handle.request.tokens
            n = min(c, len(prompt) - row.written)
            tokens[j, :n] = prompt[row.written : row.written + n]
            ints[j] = (i, row.written, n, *self.ints[i, 2:5], 0)
            floats[j] = self.floats[i]
        return group, tokens, ints, floats

    def advance(self, i: int, n: int) -> bool:
        """`n` more prompt tokens of row `i` are written; True when its prompt is complete."""
        row = self.row(i)
        row.written += n
        row.chunk += 1
        row.decoding = row.written == len(row.handle.request.tokens)
        return row.decoding

    def next_token(self, i: int, token: int, position: int, step: int) -> None:
        """Row `i` feeds `token` at `position` next step and chooses its token `step`."""
        self.ints[i, 0], self.ints[i, 1], self.ints[i, 5] = token, position, step
        self.ints[i, 6] = self.row(i).handle.request.max_new_tokens - step

    def decode_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ints.copy(), self.floats.copy()


def _now() -> float:
    import time

    return time.monotonic()
