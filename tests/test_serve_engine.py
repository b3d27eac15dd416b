"""The serving engine, scheduler and routing hooks without HTTP (specs/serving.md)."""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import AdapterExistsError, AdapterNotFoundError, ConfigError
from jaxlora.generate import generate
from jaxlora.models import Llama, LlamaConfig, forward
from jaxlora.serve import (
    Buckets,
    Engine,
    RequestTooLargeError,
    RoutingHooks,
    Row,
    Scheduler,
    parse_fallback,
    parse_split,
)

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)


def _run(engine, rows):
    """Serve `rows` together (submitted before the engine thread starts) -> `RowResult`s."""
    scheduler = Scheduler(engine)
    pending = [scheduler.submit(row) for row in rows]
    with scheduler:
        return [p.future.result(timeout=120).result for p in pending]


@pytest.fixture(scope="module")
def setup():
    model = Llama.random(CONFIG, seed=5)
    shapes = model.lora_shapes()
    bank = jaxlora.AdapterBank()
    for i, targets in enumerate([["q_proj", "v_proj"], "all-linear", ["up_proj"]]):
        cfg = jaxlora.LoraConfig(r=2 + i, lora_alpha=8, target_modules=targets,
                                 init_lora_weights=False)  # fmt: skip
        adapter = jaxlora.init_adapter(jax.random.key(i), cfg, shapes)
        bank = bank.add(
            f"a{i}", {p: dataclasses.replace(w, b=w.b * 30) for p, w in adapter.items()}
        )
    engine = Engine(model, capacity=3, rank=4, buckets=Buckets((1, 4), (4, 8), 5))
    for name in bank:
        engine.load(name, bank[name])
    return model, bank, engine


@pytest.mark.clause("SW-SERVE-1")
def test_tokens_and_logprobs_match_generate_and_the_oracle_logits(setup):
    """SW-SERVE-1: tokens equal generate() alone; logprobs equal log_softmax of the logits."""
    model, bank, engine = setup
    rows = [Row((3, 4, 5, 6, 7), "a1", 4), Row((9, 8, 7, 6, 5), None, 4)]
    rows.append(Row((1, 2, 3, 4, 5), "a2", 4, stop=(63,)))
    results = _run(engine, rows)
    for row, res in zip(rows, results, strict=True):
        lora = jaxlora.select(jaxlora.conform(bank), row.adapter)
        ref = generate(model, [list(row.tokens)], lora=lora, max_new_tokens=row.max_new_tokens)
        assert res.tokens == ref.rows()[0]
        full = np.array([list(row.tokens) + res.tokens[:-1]])
        logits = forward(model, full, lora=jaxlora.select(jaxlora.conform(bank), row.adapter))
        logp = np.asarray(jax.nn.log_softmax(logits[0, len(row.tokens) - 1 :], axis=-1))
        expected = logp[np.arange(len(res.tokens)), res.tokens]
        np.testing.assert_allclose(res.logprobs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.clause("SW-SERVE-3", "SW-SERVE-7")
def test_compilations_are_bounded_by_the_buckets(setup):
    """SW-SERVE-3, SW-SERVE-7:
    any mix of sizes, lengths, adapters and options compiles <= 2 x 2 times (the engine:
    one decode step + one prefill per chunk size, SW-ENGINE-3)."""
    _, _, engine = setup
    before = engine.compile_count()
    rng = np.random.default_rng(0)
    sampled = Row((5, 6), "a0", 5, temperature=0.9, top_k=7, seed=3)
    alone = _run(engine, [sampled])[0].tokens
    for n in [1, 2, 3, 4, 4, 1, 3]:
        rows = [
            Row(tuple(rng.integers(0, 64, rng.integers(1, 9)).tolist()),
                [None, "a0", "a1", "a2"][rng.integers(4)], int(rng.integers(1, 6)),
                temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.integers(0, 10)),
                seed=int(rng.integers(1000)))
            for _ in range(n - 1)
        ]  # fmt: skip
        results = _run(engine, [*rows, sampled])
        assert results[-1].tokens == alone
        assert [len(r.tokens) for r in results[:-1]] == [r.max_new_tokens for r in rows]
    assert engine.compile_count() - before <= len(engine.buckets.batch_sizes) * 2


@pytest.mark.clause("SW-SERVE-4")
def test_unloaded_while_queued_fails_only_that_request(setup):
    """SW-SERVE-4: a request whose adapter is unloaded before its batch runs gets a 404 error."""
    model, bank, engine = setup
    scheduler = Scheduler(engine)
    doomed = scheduler.submit(Row((1, 2, 3), "a2", 3))
    fine = scheduler.submit(Row((1, 2, 3), "a1", 3))
    engine.unload("a2")  # before the engine thread admits it
    with scheduler:
        with pytest.raises(AdapterNotFoundError, match="'a2' was unloaded"):
            doomed.future.result(timeout=60)
        lora = jaxlora.select(jaxlora.conform(bank), "a1")
        ref = generate(model, [[1, 2, 3]], lora=lora, max_new_tokens=3).rows()[0]
        assert fine.future.result(timeout=60).result.tokens == ref
    engine.load("a2", bank["a2"])
    assert sorted(engine.adapters()) == ["a0", "a1", "a2"]
    lora = jaxlora.select(jaxlora.conform(bank), "a2")
    ref = generate(model, [[1, 2, 3]], lora=lora, max_new_tokens=3).rows()[0]
    assert _run(engine, [Row((1, 2, 3), "a2", 3)])[0].tokens == ref  # reloaded: served again
    with pytest.raises(AdapterExistsError, match="already loaded"):
        engine.load("a2", bank["a2"])
    with pytest.raises(ConfigError, match="base model"):
        engine.load("base", bank["a2"])
    with pytest.raises(AdapterNotFoundError, match="Loaded"):
        engine.unload("zzz")


@pytest.mark.clause("SW-SERVE-4", "SW-SERVE-5")
def test_engine_limits_and_slot_errors(setup):
    """SW-SERVE-4, SW-SERVE-5: more adapters than device slots wait on the host; a full store,
    too-long prompts and bad values raise clear errors."""
    model, bank, engine = setup
    engine.load("x", bank["a0"])  # a 4th adapter for 3 device slots: held on the host
    lora = jaxlora.select(jaxlora.conform(bank), "a0")
    ref = generate(model, [[7, 7]], lora=lora, max_new_tokens=3).rows()[0]
    assert _run(engine, [Row((7, 7), "x", 3)])[0].tokens == ref
    engine.unload("x")
    full = Engine(model, capacity=3, rank=4, buckets=engine.buckets, max_adapters=1)
    full.load("a0", bank["a0"])
    with pytest.raises(AdapterExistsError, match="limit of 1 adapters"):
        full.load("a1", bank["a1"])
    with pytest.raises(RequestTooLargeError, match="prompt length is 9"):
        engine.check(Row(tuple(range(9)), None, 1))
    with pytest.raises(RequestTooLargeError, match="limit of 5"):
        engine.check(Row((1,), None, 6))
    with pytest.raises(ConfigError, match=r"\[0, 64\)"):
        engine.check(Row((1, 99), None, 1))
    with pytest.raises(ConfigError, match="top_k"):
        engine.check(Row((1,), None, 1, top_k=65))
    with pytest.raises(ConfigError, match="ascending"):
        Buckets((8, 1))


@pytest.mark.clause("SW-SERVE-9", "SW-SERVE-10")
def test_split_and_fallback_parsing(setup):
    """SW-SERVE-9, SW-SERVE-10:
    malformed splits/chains are refused; arms are fixed per request id."""
    split = parse_split("t=x:0.25,y:0.75")
    picks = [split.choose(f"id{i}") for i in range(200)]
    assert picks == [split.choose(f"id{i}") for i in range(200)]
    share = sum(a == "x" for a, _ in picks) / len(picks)
    assert 0.1 < share < 0.4  # 0.25 expected; sha256 is uniform
    assert all((a == "x") == (p < 0.25) for a, p in picks)
    for bad, needle in [
        ("t", "malformed"),
        ("t=x:0.5,y", "positive weight"),
        ("t=x:-1,y:2", "positive weight"),
        ("t=x:0.5,y:0.4", "sum to"),
        ("=x:1", "malformed"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            parse_split(bad)
    assert parse_fallback("c=a,b,base") == ("c", ("a", "b", "base"))
    with pytest.raises(ConfigError, match="malformed"):
        parse_fallback("c=a,,b")
    with pytest.raises(ConfigError, match="both a --split and a --fallback"):
        RoutingHooks(splits=[split], fallbacks=[("t", ("a",))])
    with pytest.raises(ConfigError, match="fallback"):
        RoutingHooks().plan({"fallback": "a"}, None, "r")
    assert RoutingHooks().plan({"adapter": "base"}, "a0", "r").chain == (None,)


@pytest.mark.clause("SW-SERVE-6")
def test_cancelled_and_expired_requests_never_run(setup):
    """SW-SERVE-6: the scheduler drops cancelled and expired requests before batching."""
    _, _, engine = setup
    scheduler = Scheduler(engine)
    cancelled = scheduler.submit(Row((1,), None, 2))
    expired = scheduler.submit(Row((2,), None, 2), timeout_s=0.01)
    kept = scheduler.submit(Row((3,), None, 2))
    scheduler.cancel(cancelled)
    time.sleep(0.05)
    with scheduler:  # the engine's first iteration ends the cancelled and the expired one
        assert kept.future.result(timeout=60).batch.rows == 1
        for pending in (cancelled, expired):
            with pytest.raises(TimeoutError):
                pending.future.result(timeout=60)
        counts = scheduler.metrics.snapshot()["requests"]
        assert (counts["cancelled"], counts["timed_out"], counts["served"]) == (1, 1, 1)


@pytest.mark.clause("SW-SERVE-5")
def test_a_row_the_engine_refuses_fails_alone_not_its_batch(setup):
    """SW-SERVE-5: a bad row (seed above 2**32) in a batch fails alone; the others are served."""
    model, bank, engine = setup
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*32\)"):
        engine.check(Row((1,), None, 1, seed=2**40))
    scheduler = Scheduler(engine)
    good = [scheduler.submit(Row((1, 2, 3), name, 3)) for name in ("a0", None)]
    with pytest.raises(ConfigError, match="got 1099511627776"):  # refused alone, at submission
        scheduler.submit(Row((4, 5), "a1", 3, temperature=0.5, seed=2**40))
    with scheduler:
        for pending, name in zip(good, ("a0", None), strict=True):
            served = pending.future.result(timeout=60)
            lora = jaxlora.select(jaxlora.conform(bank), name)
            ref = generate(model, [[1, 2, 3]], lora=lora, max_new_tokens=3).rows()[0]
            assert served.result.tokens == ref and served.batch.rows == 2
