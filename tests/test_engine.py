"""The engine: scheduling, compiled shapes, KV cache, sampling, stops, interface.

Spec: specs/engine.md."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from engine_fixtures import (
    CONFIG,
    alone,
    count_compiles,
    greedy_reference,
    make_bank,
    make_model,
    store_engine,
)

import jaxlora
from jaxlora.engine import (
    Engine,
    EngineConfig,
    QueueFullError,
    Request,
    RequestTooLargeError,
    SamplingParams,
    step_key,
)
from jaxlora.errors import AdapterNotFoundError, ConfigError
from jaxlora.generate import generate
from jaxlora.models import attention, forward


@pytest.fixture(scope="module")
def world():
    model = make_model()
    return model, make_bank(model)


@pytest.mark.clause("SW-ENGINE-1")
def test_a_short_request_finishes_while_a_long_one_is_still_decoding(world):
    """SW-ENGINE-1: a 2-token request admitted while a 40-token one decodes ends within
    len(chunk_plan) + max_new iterations; the long one gets one token in every one of them."""
    model, bank = world
    engine = store_engine(model, bank)
    long = engine.submit(Request((3, 1, 4, 1, 5), 40, "a1"))
    for _ in range(4):
        engine.step()
    assert len(long.tokens) == 5  # iteration 1: token 0 from the prefill, 1 from the decode
    short = engine.submit(Request((9, 2), 2, "a0"))
    before, iterations = len(long.tokens), 0
    while not short.done():
        engine.step()
        iterations += 1
    assert iterations <= len(CONFIG.chunk_plan(2)) + 2
    assert not long.done() and len(long.tokens) == before + iterations
    engine.run_until_done()
    assert short.result().tokens == alone(model, bank, short.request).tokens
    assert long.result().tokens == alone(model, bank, long.request).tokens


@pytest.mark.clause("SW-ENGINE-1")
def test_freed_rows_are_refilled_in_arrival_order(world):
    """SW-ENGINE-1: 6 requests on 4 rows; the 5th and 6th take the rows the first to finish
    free, in the iteration after, in arrival order."""
    model, bank = world
    engine = store_engine(model, bank)
    limits = [9, 3, 9, 4, 3, 3]  # requests 1 and 3 end first (iterations 2 and 3)
    handles = [engine.submit(Request((1 + i, 2), n, None)) for i, n in enumerate(limits)]
    engine.step()
    occupied = lambda: {h.id for h in engine.pool.handles()}  # noqa: E731
    assert occupied() == {h.id for h in handles[:4]}
    while not handles[1].done():
        engine.step()
    engine.step()
    assert handles[4].id in occupied() and handles[5].id not in occupied()
    engine.run_until_done()
    queued = [h.result().queue_s for h in handles]
    assert queued[4] <= queued[5] and max(queued[:4]) <= queued[4]


@pytest.mark.clause("SW-ENGINE-8")
def test_a_cancelled_row_stops_consuming_steps_and_is_reused(world):
    """SW-ENGINE-8: after cancel(), the request takes part in no more decode step, keeps its
    tokens, and its row goes to the waiting request in the same iteration."""
    model, bank = world
    engine = store_engine(model, bank)
    running = [engine.submit(Request((5, 6, 7), 30, "a2")) for _ in range(CONFIG.rows)]
    waiting = engine.submit(Request((8,), 3, None))
    for _ in range(5):
        engine.step()
    victim = running[1]
    steps_before, tokens_before = victim.info["steps"], victim.tokens
    engine.cancel(victim)
    engine.step()
    result = victim.result()
    assert result.finish_reason == "cancelled" and result.tokens == tokens_before
    assert result.steps == steps_before
    assert waiting.id in {h.id for h in engine.pool.handles()} or waiting.done()
    for _ in range(3):
        engine.step()
    assert victim.info["steps"] == steps_before
    timed = engine.submit(Request((4,), 30, None, timeout_s=1e-3))
    time.sleep(0.01)
    engine.step()
    assert timed.result().finish_reason == "timeout" and timed.result().tokens == []
    for h in running:
        engine.cancel(h)
    engine.run_until_done()
    assert waiting.result().tokens == alone(model, bank, waiting.request).tokens
    assert engine.metrics()["ended"] == {"cancelled": CONFIG.rows, "timeout": 1}


@pytest.mark.clause("SW-ENGINE-3")
def test_compiles_exactly_the_stated_shapes_and_nothing_more(world):
    """SW-ENGINE-3: a run touching every chunk size, sampling settings and swap-ins compiles
    one decode step and one prefill per chunk; a second run compiles nothing at all."""
    model, bank = world
    config = EngineConfig(rows=3, max_len=44, chunks=(2, 8, 16), prefill_tokens=16, slots=2, rank=4)
    assert config.compiled_shapes() == {
        "decode": (3, 1),
        "prefill/2": (8, 2),
        "prefill/8": (2, 8),
        "prefill/16": (1, 16),
    }
    engine = store_engine(model, bank, config)
    rng = np.random.default_rng(0)

    def workload():
        return [
            Request(
                tuple(rng.integers(0, 64, n).tolist()),
                int(rng.integers(1, 6)),
                [None, "a0", "a1", "a2", "a3", "a4"][i % 6],
                SamplingParams(float(i % 2), i % 4, [1.0, 0.7][i % 2], i),
                stop_tokens=(int(rng.integers(64)),),
            )
            for i, n in enumerate([1, 2, 5, 8, 13, 16, 23, 38])
        ]

    engine.generate(workload())
    plans = {c for n in [1, 2, 5, 8, 13, 16, 23, 38] for c in config.chunk_plan(n)}
    assert plans == set(config.chunks)
    assert engine.compile_counts() == {"decode": 1, "prefill": 3}
    assert engine.metrics()["adapters"]["swap_ins"] > config.slots
    with count_compiles() as compiles:
        engine.generate(workload())
    assert compiles[0] == 0 and engine.compile_counts() == {"decode": 1, "prefill": 3}


def _compiled(engine: Engine, chunk: int):
    args = (engine._state, engine._cache, engine._bank, engine._fixed)
    ints, floats = engine.pool.decode_arrays()
    control = np.asarray([1, 0], np.int32)
    block = engine.config.decode_steps
    decode = engine.steps.decode.lower(
        *args, ints, floats, control, routing="auto", block=block
    ).compile()
    p = engine.config.prefill_rows(chunk)
    prefill = engine.steps.prefill.lower(
        *args,
        np.zeros((p, chunk), np.int32),
        np.zeros((p, 7), np.int32),
        np.zeros((p, 2), np.float32),
        routing="auto",
    ).compile()
    return decode.memory_analysis(), prefill.memory_analysis()


@pytest.mark.clause("SW-ENGINE-6")
def test_the_kv_cache_is_bounded_and_updated_in_place(world):
    """SW-ENGINE-6: the cache has exactly cache_bytes; the step consumes it (donated); the
    decode step's temporaries grow with max_len less than one layer's keys do (no cache copy);
    prefill's do not grow with rows."""
    model, bank = world
    cfg = model.config
    engines = {}
    for rows, max_len in [(4, 128), (4, 512), (16, 128)]:
        config = dataclasses.replace(CONFIG, rows=rows, max_len=max_len)
        engine = engines[rows, max_len] = store_engine(model, bank, config)
        held = sum(a.nbytes for a in (*engine._cache.k, *engine._cache.v))
        assert held == attention.cache_bytes(
            cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim, jnp.float32
        )
        assert engine._cache.k[0].shape == (rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
    (d_short, p_4), (d_long, _), (_, p_16) = (_compiled(e, 16) for e in engines.values())
    keys_growth = engines[4, 512]._cache.k[0].nbytes - engines[4, 128]._cache.k[0].nbytes
    assert d_long.temp_size_in_bytes - d_short.temp_size_in_bytes < keys_growth
    assert p_4.temp_size_in_bytes == p_16.temp_size_in_bytes
    engine = engines[4, 128]
    old = engine._cache.k[0]
    engine.generate([Request((1, 2, 3), 2, "a0")])
    assert old.is_deleted()
    half = store_engine(model, bank, dataclasses.replace(CONFIG, cache_dtype="bfloat16"))
    assert half._cache.k[0].dtype == jnp.bfloat16
    assert half._cache.k[0].nbytes * 2 == store_engine(model, bank)._cache.k[0].nbytes
    assert len(half.generate([Request((1, 2, 3), 4, "a1")])[0].tokens) == 4


def _reference_sample(model, bank, request: Request, out: list[int]) -> list[int]:
    """SW-ENGINE-4 computed from the text: full forward per step, NumPy filtering."""
    s = request.sampling
    lora = (
        None if request.adapter is None else jaxlora.select(jaxlora.conform(bank), request.adapter)
    )
    chosen = []
    for t in range(len(out)):
        prefix = list(request.tokens) + out[:t]
        logits = np.asarray(forward(model, np.asarray([prefix]), lora=lora))[0, -1]
        z = logits.astype(np.float32) / np.float32(s.temperature)
        keep = np.ones(z.shape, bool)
        if s.top_k:
            keep &= z >= np.sort(z)[::-1][s.top_k - 1]
        if s.top_p < 1:
            order = np.argsort(-np.where(keep, z, -np.inf), kind="stable")
            p = np.exp(z[order] - z[order][0]) * keep[order]
            p = p / p.sum()
            mass = np.cumsum(p) - p
            last = z[order][np.sum(mass < s.top_p) - 1]
            keep &= z >= last
        zk = jnp.asarray(np.where(keep, z, -np.inf))
        chosen.append(int(jax.random.categorical(step_key(jnp.uint32(s.seed), t), zk)))
    return chosen


@pytest.mark.clause("SW-ENGINE-4")
def test_sampling_follows_the_spec_definition(world):
    """SW-ENGINE-4: sampled tokens equal the definition recomputed from full forwards; top_k=1
    and a tiny top_p are greedy; logprobs are log_softmax of the logits; bad values raise."""
    model, bank = world
    engine = store_engine(model, bank)
    requests = [
        Request((4, 9, 1), 6, "a1", SamplingParams(1.3, 0, 1.0, 7)),
        Request((2, 2), 6, None, SamplingParams(0.8, 5, 1.0, 2**32 - 1)),
        Request((7, 3, 3, 8), 6, "a3", SamplingParams(1.0, 0, 0.6, 12)),
        Request((5,), 6, "a0", SamplingParams(2.0, 10, 0.9, 3)),
    ]
    results = engine.generate(requests)
    for req, res in zip(requests, results, strict=True):
        assert res.tokens == _reference_sample(model, bank, req, res.tokens), req
    base = Request((4, 9, 1), 6, "a1")
    greedy = greedy_reference(model, bank, base)
    for sampling in (SamplingParams(5.0, 1, 1.0, 1), SamplingParams(5.0, 0, 1e-6, 1)):
        assert engine.generate([dataclasses.replace(base, sampling=sampling)])[0].tokens == greedy
    res = engine.generate([base])[0]
    lora = jaxlora.select(jaxlora.conform(bank), "a1")
    full = np.asarray([list(base.tokens) + res.tokens[:-1]])
    logp = np.asarray(jax.nn.log_softmax(forward(model, full, lora=lora)[0, 2:], axis=-1))
    np.testing.assert_allclose(res.logprobs, logp[np.arange(6), res.tokens], atol=1e-4)
    for bad, words in [
        (SamplingParams(-1.0), "temperature must be a finite number >= 0"),
        (SamplingParams(float("nan")), "temperature"),
        (SamplingParams(1.0, 65), r"top_k must be an int in \[0, 64\]"),
        (SamplingParams(1.0, 0, 0.0), r"top_p must be a number in \(0, 1\]"),
        (SamplingParams(1.0, 0, 1.0, 2**32), r"seed must be in \[0, 2\*\*32\)"),
    ]:
        with pytest.raises(ConfigError, match=words):
            engine.submit(dataclasses.replace(base, sampling=bad))


@pytest.mark.clause("SW-ENGINE-5")
def test_stop_tokens_stop_strings_and_limits(world):
    """SW-ENGINE-5: stop token / string end the request (kept, named); limits raise clearly."""
    model, bank = world
    detok = lambda ids: "".join(chr(65 + t % 26) for t in ids)  # noqa: E731
    engine = store_engine(model, bank, detokenize=detok)
    free = engine.generate([Request((3, 8, 1), 10, "a4")])[0].tokens
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    stopped = engine.generate([Request((3, 8, 1), 10, "a4", stop_tokens=(free[k], 63))])[0]
    assert stopped.tokens == free[: k + 1]
    assert (stopped.finish_reason, stopped.stop) == ("stop", free[k])
    text = detok(free[k - 1 : k + 1])
    by_text = engine.generate([Request((3, 8, 1), 10, "a4", stop_strings=(text,))])[0]
    assert (by_text.tokens, by_text.stop) == (free[: k + 1], text)
    assert engine.generate([Request((3, 8, 1), 3, "a4")])[0].finish_reason == "length"
    for request, error, words in [
        (Request(tuple(range(40)), 9, None), RequestTooLargeError, "49, above .* limit of 48"),
        (Request((1,), 1, None, stop_tokens=(1, 2, 3, 4, 5)), RequestTooLargeError, "at most 4"),
        (Request((), 1, None), ConfigError, "prompt is empty"),
        (Request((1, 64), 1, None), ConfigError, r"\[0, 64\); got \[64\]"),
        (Request((1,), 0, None), ConfigError, "max_new_tokens must be a positive int"),
        (Request((1,), 1, "zz"), AdapterNotFoundError, "'zz' is loaded. Loaded: 'a0'"),
    ]:
        with pytest.raises(error, match=words):
            engine.submit(request)
    with pytest.raises(ConfigError, match="stop strings need an engine with a `detokenize`"):
        store_engine(model, bank).submit(Request((1,), 2, None, stop_strings=("x",)))
    tight = store_engine(model, bank, dataclasses.replace(CONFIG, max_waiting=1))
    tight.submit(Request((1,), 2, None))
    with pytest.raises(QueueFullError, match="1 requests already wait"):
        tight.submit(Request((1,), 2, None))


@pytest.mark.clause("SW-ENGINE-9")
def test_stream_listener_and_failure_from_asyncio(world):
    """SW-ENGINE-9: on the engine thread, stream() and add_listener deliver every token in
    order, then the end; a request failing (adapter removed while waiting) raises."""
    model, bank = world
    engine = store_engine(model, bank)
    heard = []
    with engine:
        handle = engine.submit(Request((1, 9, 4), 8, "a2"))
        handle.add_listener(heard.append)

        async def collect():
            return [t.id async for t in handle.stream()]

        streamed = asyncio.run(collect())
        result = handle.result(timeout=120)
    assert streamed == result.tokens == [t.id for t in heard[:-1]] and heard[-1] is None
    assert [t.index for t in heard[:-1]] == list(range(8))
    assert result.tokens == alone(model, bank, handle.request).tokens
    stepped = store_engine(model, bank)
    doomed = stepped.submit(Request((1, 2), 3, "a3"))
    stepped.remove_adapter("a3")
    stepped.run_until_done()
    with pytest.raises(AdapterNotFoundError, match="'a3' was unloaded before the request ran"):
        doomed.result()


@pytest.mark.clause("SW-ENGINE-2", "SW-ENGINE-9")
def test_generate_is_the_engine(world):
    """SW-ENGINE-2, SW-ENGINE-9: generate(config=C) equals an engine over the same stacked
    bank row by row, bitwise, and each row equals itself alone; greedy equals the reference."""
    model, bank = world
    stacked = jaxlora.stack(jaxlora.conform(bank))
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12]]
    names = ["a1", None, "a4", "a1"]
    kwargs = dict(max_new_tokens=5, temperature=0.9, top_k=8, seed=[1, 2, 3, 4], config=CONFIG)
    out = generate(model, prompts, lora=stacked.route(names), **kwargs)
    engine = Engine(model, CONFIG, bank=stacked)
    requests = [
        Request(tuple(p), 5, n, SamplingParams(0.9, 8, 1.0, s))
        for p, n, s in zip(prompts, names, [1, 2, 3, 4], strict=True)
    ]
    for i, res in enumerate(engine.generate(requests)):
        assert out.rows()[i] == res.tokens
        np.testing.assert_array_equal(out.logprobs[i, : len(res.tokens)], res.logprobs)
        one = generate(
            model, [prompts[i]], lora=stacked.route([names[i]]), **kwargs | {"seed": [i + 1]}
        )
        assert one.rows()[0] == res.tokens
    greedy = generate(model, prompts, lora=stacked.route(names), max_new_tokens=5)
    for i, row in enumerate(greedy.rows()):
        assert row == greedy_reference(model, bank, Request(tuple(prompts[i]), 5, names[i]))


@pytest.mark.clause("SW-ENGINE-10")
def test_a_row_left_full_of_nan_serves_the_next_request_exactly(world):
    """SW-ENGINE-10: requests on an adapter that overflows to NaN fill every row's cache with
    non-finite values; the requests after them, on the same rows, equal themselves alone."""
    model, bank = world
    huge = {p: dataclasses.replace(w, b=w.b * 1e30) for p, w in bank["a1"].items()}
    engine = store_engine(model, bank)
    engine.add_adapter("huge", huge)
    overflowed = engine.generate([Request((3, 1, 4), 6, "huge") for _ in range(CONFIG.rows)])
    assert all(not np.isfinite(r.logprobs).all() for r in overflowed)
    assert not all(np.isfinite(np.asarray(v)).all() for v in engine._cache.v)
    after = [Request((2, 7), 5, "a0"), Request((5,), 6, None), Request((1, 2, 3, 4, 5), 4, "a3")]
    after.append(Request(tuple(range(20)), 3, "a1"))
    for request, result in zip(after, engine.generate(after), strict=True):
        single = alone(model, bank, request)
        assert (result.tokens, result.logprobs) == (single.tokens, single.logprobs)
        assert np.isfinite(result.logprobs).all()


@pytest.mark.clause("SW-ENGINE-1", "SW-ENGINE-2")
def test_several_decode_steps_per_call_follow_the_stated_rule(world):
    """SW-ENGINE-1, SW-ENGINE-2: with decode_steps=4 a lone request gets 1 + 4 tokens in its
    first iteration; a call stops at a row's end while requests wait, runs one step while a
    prompt prefills; each request equals itself alone (bitwise) and the greedy reference."""
    model, bank = world
    config = dataclasses.replace(CONFIG, rows=2, decode_steps=4)
    engine = store_engine(model, bank, config)
    lone = engine.submit(Request((3, 1, 4), 10, "a1"))
    got = []
    while not lone.done():
        engine.step()
        got.append(len(lone.tokens))
    assert got == [5, 9, 10]
    assert lone.result().tokens == greedy_reference(model, bank, lone.request)
    # rows=2: a 2-token and a 9-token request decode; a third waits for a row
    handles = [
        engine.submit(Request((1, 2), 2, "a0")),
        engine.submit(Request((4, 4), 9, None)),
        engine.submit(Request(tuple(range(20)), 3, "a2")),  # 2 chunks: (16, 4)
    ]
    engine.step()  # prefill of both, then a call that ends with the short one (1 step)
    assert handles[0].done() and len(handles[1].tokens) == 2
    engine.step()  # the third is admitted, prefills chunk 1 of 2: one step for the others
    assert len(handles[1].tokens) == 3 and handles[2].tokens == []
    engine.step()  # its last chunk, its first token; then up to 4 steps (nothing waits)
    assert len(handles[1].tokens) == 7 and handles[2].done()
    engine.run_until_done()
    assert engine.compile_counts()["decode"] == 1
    for h in [lone, *handles]:
        single = alone(model, bank, h.request, config)  # alone: other call lengths
        assert (h.result().tokens, h.result().logprobs) == (single.tokens, single.logprobs)
        assert h.result().tokens == greedy_reference(model, bank, h.request)
