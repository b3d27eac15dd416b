"""Adapters beyond the device slots: the host store and the LRU of device slots (SW-ENGINE-7)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from engine_fixtures import CONFIG, alone, count_compiles, make_bank, make_model, store_engine

import jaxlora
from jaxlora.engine import Request, SlotCache
from jaxlora.engine.adapters import AdapterStore, empty_bank
from jaxlora.errors import AdapterExistsError, ConfigError, NonFiniteError, ShapeMismatchError


@pytest.fixture(scope="module")
def world():
    model = make_model()
    return model, make_bank(model)


@pytest.mark.clause("SW-ENGINE-7")
def test_slot_cache_lru_rules():
    """SW-ENGINE-7: free slots first, then the least recently used unpinned one; a pinned slot
    is never a victim nor written; a removed adapter's slot is freed when its last row ends."""
    cache = SlotCache(3)
    for slot, key in enumerate("abc"):
        assert cache.victim() == slot
        cache.install(key, slot)
    cache.pin(cache.resident["a"])  # a in use
    cache.pin(cache.resident["b"])
    cache.unpin(cache.resident["b"])  # b used last
    assert cache.victim() == cache.resident["c"]  # c: least recently used, unpinned
    cache.install("d", cache.victim())
    assert "c" not in cache.resident and cache.stats.evictions == 1
    assert cache.victim() == cache.resident["b"]
    cache.pin(cache.resident["b"])
    cache.pin(cache.resident["d"])
    assert cache.victim() is None  # all pinned: a new adapter must wait
    with pytest.raises(RuntimeError, match="pinned"):
        cache.install("e", 0)
    slot = cache.resident["a"]
    cache.drop("a")  # removed while in use: no more hits, the slot stays until unpinned
    assert "a" not in cache.resident and cache.owner[slot] == "a" and cache.victim() is None
    cache.unpin(slot)
    assert cache.owner[slot] is None and cache.victim() == slot
    fixed = SlotCache(2, fixed=["x", "y"])
    assert fixed.victim() is None and fixed.resident == {"x": 0, "y": 1}


@pytest.mark.clause("SW-ENGINE-7", "SW-ENGINE-2")
def test_swap_ins_never_change_a_live_row_and_never_recompile(world):
    """SW-ENGINE-7, SW-ENGINE-2: 5 adapters through 2 slots while long rows pin them: every
    request equals itself alone, requests wait only for a slot, nothing compiles, metrics
    count hits, misses once per request, swap-ins and their time."""
    model, bank = world
    engine = store_engine(model, bank)
    engine.generate([Request((1,), 2, "a0")])  # compile everything once
    writes = []
    real = engine.slots.install

    def install(key, slot):
        assert engine.slots.pins[slot] == 0, "a pinned slot was written"
        writes.append((key[0], slot))
        real(key, slot)

    engine.slots.install = install
    stats = engine.slots.stats
    hits, misses = stats.hits, stats.misses
    requests = [
        Request((2, 7, 1), 12, "a1"),  # pins a slot for 12 steps
        Request((3, 3), 12, "a2"),  # pins the other
        Request((4,), 3, "a3"),  # waits for a slot, while a base request passes it
        Request((9, 9, 9), 4, None),
        Request((5, 1), 3, "a1"),  # a hit on the pinned a1
        Request((6,), 3, "a4"),
        Request((8, 2), 3, "a0"),
    ]
    with count_compiles() as compiles:
        handles = [engine.submit(r) for r in requests]
        engine.run_until_done()
    assert compiles[0] == 0
    results = [h.result() for h in handles]
    for request, result in zip(requests, results, strict=True):
        assert result.tokens == alone(model, bank, request).tokens, request
    assert results[3].queue_s < results[2].queue_s  # the base request was not held back
    assert {name for name, _ in writes} >= {"a1", "a2", "a3", "a4", "a0"}
    assert stats.misses - misses == 5 and stats.hits - hits == 1
    assert stats.swap_ins >= 5 and stats.swap_in_seconds > 0 and stats.evictions >= 3
    metrics = engine.metrics()["adapters"]
    assert metrics["misses"] == stats.misses and metrics["pinned_slots"] == 0


@pytest.mark.clause("SW-ENGINE-7")
def test_removing_an_adapter_fails_waiters_and_lets_running_rows_finish(world):
    """SW-ENGINE-7: a row using an adapter finishes with it after the adapter is removed; a
    request still waiting for it fails; a reload is a new version in a new slot."""
    model, bank = world
    engine = store_engine(model, bank)
    running = engine.submit(Request((2, 7, 1), 8, "a1"))
    engine.step()
    engine.step()
    engine.remove_adapter("a1")
    engine.step()
    assert "a1" not in engine.adapter_names() and not running.done()
    engine.run_until_done()
    assert running.result().tokens == alone(model, bank, running.request).tokens
    assert all(key[0] != "a1" for key in engine.slots.resident)
    assert engine.slots.owner.count(None) >= 1  # its slot was freed when the row ended
    engine.add_adapter("a1", bank["a2"])  # the name again, other weights
    again = engine.generate([Request((2, 7, 1), 8, "a1")])[0]
    assert again.tokens == alone(model, bank, Request((2, 7, 1), 8, "a2")).tokens


@pytest.mark.clause("SW-ENGINE-7")
def test_the_store_validates_once_and_refuses_what_does_not_fit(world):
    """SW-ENGINE-7: adapters are checked when added, naming the adapter and the fix."""
    model, bank = world
    template = empty_bank(model.lora_shapes(), 2, 4, sorted(model.lora_shapes()), np.float32)
    store = AdapterStore(template, max_adapters=2)
    store.add("a0", bank["a0"])
    with pytest.raises(AdapterExistsError, match="'a0' is already loaded"):
        store.add("a0", bank["a1"])
    cfg = jaxlora.LoraConfig(r=8, target_modules=["q_proj"], init_lora_weights=False)
    wide = jaxlora.init_adapter(jax.random.key(0), cfg, model.lora_shapes())
    with pytest.raises(
        ShapeMismatchError, match=r"adapter 'wide'.*rank 8 exceeds the bank's rank 4"
    ):
        store.add("wide", wide)
    bad = {p: jaxlora.LoraWeights(w.a * np.nan, w.b, w.scale) for p, w in bank["a1"].items()}
    with pytest.raises(NonFiniteError, match=r"adapter .nan., layer .*factor `a`.*NaN"):
        store.add("nan", bad)
    store.add("a1", bank["a1"])
    with pytest.raises(AdapterExistsError, match="limit of 2 adapters"):
        store.add("a2", bank["a2"])
    assert store.names() == ["a0", "a1"] and len(store) == 2
    few = store_engine(model, bank, CONFIG)
    with pytest.raises(ConfigError, match="engine targets must be projections"):
        empty_bank(model.lora_shapes(), 2, 4, ["model.nope"], np.float32)
    assert sorted(few.adapter_names()) == sorted(bank.names)
