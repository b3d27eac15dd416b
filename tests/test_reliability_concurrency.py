"""Many threads, one jitted forward, one shared model and bank (specs/reliability.md SW-CONC-1..2).

Every result is compared bitwise with the same call made alone, single-threaded, beforehand.
The harness is shown to catch a race: a PEFT-style object with one mutable "active adapter"
(`GlobalActiveModel`, broken on purpose) fails it under the same thread schedule.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

THREADS = 8
PATHS = ["blocks.0.q", "blocks.0.v", "blocks.1.q", "head"]
WIDTHS = [16, 16, 16, 16, 8]
SELECTIONS = [("a",), ("b",), ("c",), ("d",), (), ("a", "c"), ("d", "b")]
ROW_IDS = [[0, 1, 2, 3], [3, -1, 0, 0], [-1, -1, 2, 1], [1, 1, 1, 1], [2, 0, -1, 3]]


# Own functions, not `jax.jit(jaxlora.forward)`: jit caches are per function, so wrapping the
# library function directly would share (and count) other tests' compilations.
def _forward(model, x, lora):
    return jaxlora.forward(model, x, lora=lora)


def _forward_mixed(model, x, stacked, ids):
    return jaxlora.forward(model, x, lora=jaxlora.Routed(stacked, ids))


_FWD = jax.jit(_forward)
_FWD_MIXED = jax.jit(_forward_mixed)


def _setup():
    key = jax.random.key(7)
    model = jaxlora.DenseChain.init(key, PATHS, WIDTHS)
    bank = jaxlora.AdapterBank()
    for i, name in enumerate("abcd"):
        cfg = jaxlora.LoraConfig(
            r=1 + i, lora_alpha=2.0 + i, target_modules=PATHS[i % 2 :: 2], init_lora_weights=False
        )
        bank = bank.add(
            name, jaxlora.init_adapter(jax.random.fold_in(key, i), cfg, model.layer_shapes())
        )
    xs = [jax.random.normal(jax.random.fold_in(key, 100 + t), (4, WIDTHS[0])) for t in range(8)]
    return model, jaxlora.conform(bank), xs


MODEL, BANK, XS = _setup()
STACKED = jaxlora.stack(BANK)


class GlobalActiveModel:
    """BROKEN on purpose: PEFT's design, one mutable active adapter shared by every caller.

    Example:
        >>> m = GlobalActiveModel(MODEL, BANK)
        >>> m.set_adapter(("a",)); m.forward(XS[0]).shape
        (4, 8)
    """

    def __init__(self, model, bank):
        self.model, self.bank, self.active = model, bank, ()

    def set_adapter(self, names: tuple[str, ...]) -> None:
        self.active = jaxlora.select(self.bank, list(names))

    def forward(self, x) -> np.ndarray:
        return np.asarray(_FWD(self.model, x, self.active))


def run_threads(
    calls: int,
    prepare: Callable[[int, int], object],
    serve: Callable[[int, int, object], np.ndarray],
    expected: Callable[[int, int], np.ndarray],
    *,
    lockstep: bool,
    background: Callable[[threading.Event], None] | None = None,
) -> tuple[int, int]:
    """`THREADS` threads each run `calls` requests: `prepare(t, i)` (choose the adapter), then
    `serve(t, i, handle)`. With `lockstep`, all threads finish `prepare` before any serves (the
    interleaving a busy server hits); else they run freely. Returns (requests, mismatches)."""
    barrier = threading.Barrier(THREADS)
    counts = [[0, 0] for _ in range(THREADS)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(calls):
                handle = prepare(t, i)
                if lockstep:
                    barrier.wait()
                y = serve(t, i, handle)
                want = expected(t, i)
                counts[t][0] += 1
                counts[t][1] += int(y.dtype != want.dtype or not np.array_equal(y, want))
                if lockstep:
                    barrier.wait()
        except BaseException as e:  # surfaced below; a dead thread must fail the test
            errors.append(e)
            barrier.abort()

    stop = threading.Event()
    side = threading.Thread(target=background, args=(stop,)) if background else None
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in [*threads, *([side] if side else [])]:
        th.start()
    for th in threads:
        th.join(timeout=120)
    stop.set()
    if side:
        side.join(timeout=60)
    assert not errors, errors
    assert not any(th.is_alive() for th in threads), "a worker hung"
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def selection(t: int, i: int) -> tuple[str, ...]:
    return SELECTIONS[(t * 3 + i) % len(SELECTIONS)]


def single_reference() -> dict:
    """Every (input, selection) result, computed alone before any thread starts."""
    return {
        (t, sel): np.asarray(_FWD(MODEL, XS[t], jaxlora.select(BANK, list(sel))))
        for t in range(THREADS)
        for sel in SELECTIONS
    }


def mixed_reference() -> dict:
    return {
        (t, k): np.asarray(_FWD_MIXED(MODEL, XS[t], STACKED, jnp.asarray(ids, jnp.int32)))
        for t in range(THREADS)
        for k, ids in enumerate(ROW_IDS)
    }


def churn_banks(stop: threading.Event) -> None:
    """SW-CONC-2's writer: builds new banks from BANK while the readers serve from it."""
    w = BANK["a"]
    while not stop.is_set():
        bank = BANK.add("e", w).replace("a", BANK["b"]).remove("c")
        jaxlora.stack(jaxlora.conform(bank))


@pytest.fixture
def frequent_thread_switches():
    """Make the interpreter switch threads every microsecond (default 5 ms), so that requests
    really interleave instead of running one GIL slice each."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.clause("SW-CONC-1")
@pytest.mark.clause("SW-CONC-2")
def test_threads_share_one_jitted_forward_bitwise(frequent_thread_switches):
    """SW-CONC-1, SW-CONC-2: 8 threads x 1000 calls of one jitted forward (each its own input and
    adapter selection, switching every call) and 8 x 500 mixed-batch calls, while another thread
    builds new banks from the shared one: every result is bitwise the single-threaded one, and
    nothing is compiled after the warm-up."""
    ref = single_reference()
    ref_mixed = mixed_reference()
    compiled = (_FWD._cache_size(), _FWD_MIXED._cache_size())
    # one adapter (no adapter is the first one gated off: the same structure, SW-ACTIVE-2), two
    # adapters; one mixed structure
    assert compiled == (2, 1)
    leaves_before = [np.array(x) for x in jax.tree.leaves(BANK)]

    served, wrong = run_threads(
        1000,
        lambda t, i: jaxlora.select(BANK, list(selection(t, i))),
        lambda t, i, active: np.asarray(_FWD(MODEL, XS[t], active)),
        lambda t, i: ref[(t, selection(t, i))],
        lockstep=False,
        background=churn_banks,
    )
    assert (served, wrong) == (THREADS * 1000, 0)

    k = lambda t, i: (t + i) % len(ROW_IDS)  # noqa: E731
    served, wrong = run_threads(
        500,
        lambda t, i: jnp.asarray(ROW_IDS[k(t, i)], jnp.int32),
        lambda t, i, ids: np.asarray(_FWD_MIXED(MODEL, XS[t], STACKED, ids)),
        lambda t, i: ref_mixed[(t, k(t, i))],
        lockstep=False,
        background=churn_banks,
    )
    assert (served, wrong) == (THREADS * 500, 0)
    assert (_FWD._cache_size(), _FWD_MIXED._cache_size()) == compiled
    for before, after in zip(leaves_before, jax.tree.leaves(BANK), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))


@pytest.mark.clause("SW-CONC-1")
def test_global_active_adapter_races_where_select_does_not():
    """SW-CONC-1: under the same lockstep schedule (every thread picks its adapter, then every
    thread serves), a PEFT-style object with a shared `set_adapter` state serves most requests
    with another thread's adapter, while `select` + the pure forward serves every one right."""
    ref = single_reference()
    shared = GlobalActiveModel(MODEL, BANK)

    served, wrong = run_threads(
        10,
        lambda t, i: shared.set_adapter(selection(t, i)),
        lambda t, i, _: shared.forward(XS[t]),
        lambda t, i: ref[(t, selection(t, i))],
        lockstep=True,
    )
    assert served == THREADS * 10 and wrong >= served // 2, (served, wrong)

    served, wrong = run_threads(
        10,
        lambda t, i: jaxlora.select(BANK, list(selection(t, i))),
        lambda t, i, active: np.asarray(_FWD(MODEL, XS[t], active)),
        lambda t, i: ref[(t, selection(t, i))],
        lockstep=True,
    )
    assert (served, wrong) == (THREADS * 10, 0)
