"""The native `POST /generate` on the one server, real HTTP on 127.0.0.1 (SW-SERVE-*).

The server is `jaxlora serve`'s app (`jaxlora.serve.openai.create_app`): the native route
shares the registry, hooks, security middleware, limits and metrics of the OpenAI routes.
References are offline generation (the request alone on a separate engine, `Engine.generate`)
and, for log-probabilities, the forward oracle's logits.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import socket
import time
import urllib.parse

import jax
import numpy as np
import pytest

pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

from openai_support import (
    NAMES,
    VOCAB,
    build_world,
    engine_for,
    http,
    service_for,
    start_server,
    tiny_adapter,
)
from prometheus_client.parser import text_string_to_metric_families

import jaxlora
from jaxlora.commands import serve as serve_command
from jaxlora.engine import Engine, EngineConfig, Request, SamplingParams
from jaxlora.errors import ConfigError
from jaxlora.models import forward
from jaxlora.serve import Policy, RoutingHooks, parse_fallback, parse_split
from jaxlora.serve.hooks import mean_logprob

UNICODE = "ünï☃"
PROMPTS = [(1, 5, 9), (3, 60, 7, 22, 41, 8), tuple(range(100, 120))]
NEW = 4
CONFIG = EngineConfig(rows=8, max_len=96, chunks=(16, 64), slots=3, rank=8, stop_width=8)
KEYS = {"id", "adapter", "adapter_version", "tokens", "logprobs", "finish_reason", "route", "text"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = build_world(tmp_path_factory.mktemp("native"))
    jaxlora.io.save_peft(w.root / "late", tiny_adapter(w.model, 7))
    jaxlora.io.save_peft(w.root / "wide", tiny_adapter(w.model, 8, rank=16))  # above rank 8
    shapes = w.model.lora_shapes()
    late = jaxlora.io.load_peft_adapter(w.root / "late", layer_shapes=shapes, name="late")[0]
    w.extra = {"late": late, UNICODE: tiny_adapter(w.model, 9)}  # type: ignore[attr-defined]
    return w


@pytest.fixture(scope="module")
def reference(world):
    """`(tokens, adapter, n, sampling, stop) -> engine Result` of the request alone, offline."""
    engine = engine_for(world)
    for name, adapter in (world.adapters | world.extra).items():
        engine.add_adapter(name, adapter)
    memo = {}

    def run(tokens, adapter, n=NEW, sampling=None, stop=()):
        key = (tuple(tokens), adapter, n, sampling, tuple(stop))
        if key not in memo:
            request = Request(tuple(tokens), n, adapter, sampling or SamplingParams(), stop)
            memo[key] = engine.generate([request])[0]
        return memo[key]

    return run


def _classify(body):
    metadata = body.get("metadata") or {}
    if metadata.get("explode"):
        raise RuntimeError("classifier exploded")
    return metadata.get("topic")


def _confidence(body, result):
    if (body.get("metadata") or {}).get("slow"):
        time.sleep(0.4)
    return mean_logprob(body, result)


@pytest.fixture(scope="module")
def served(world):
    """Classifier, an A/B split, a fallback chain (min_confidence 1: only the last attempt is
    accepted), runtime loading with unauthenticated admin, 3 device slots for 5 adapters."""
    hooks = RoutingHooks(
        classifier=_classify,
        splits=[parse_split("summarize=alpha:0.5,beta:0.5")],
        fallbacks=[parse_fallback("code=beta,gamma,base")],
        confidence=_confidence,
        min_confidence=1.0,
    )
    engine = Engine(world.model, CONFIG, max_adapters=10)
    policy = Policy(allow_unauthenticated_admin=True)
    service = service_for(world, engine, hooks=hooks, policy=policy, runtime_loading=True)
    service.registry.add(UNICODE, world.extra[UNICODE])
    engine.warmup()
    server = start_server(service)
    yield server, service
    server.stop()


def _gen(url, body, headers=None):
    status, got, raw = http(url + "/generate", "POST", body, headers)
    return status, json.loads(raw), got


def _many(url, bodies, workers=24):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: _gen(url, b), bodies))


def _metrics(url):
    out = {}
    for family in text_string_to_metric_families(http(url + "/metrics")[2].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _responses(metrics, status, endpoint="/generate"):
    key = ("jaxlora_responses_total", (("endpoint", endpoint), ("status", str(status))))
    return metrics.get(key, 0)


def _version(service, name):
    return "base" if name is None else service.registry.get(name).version


@pytest.mark.clause("SW-SERVE-1", "SW-SERVE-2", "SW-SERVE-3", "SW-SEC-7", "SW-ADAPT-2")
def test_concurrent_clients_on_mixed_adapters_equal_offline_generation(
    world, served, reference, monkeypatch
):
    """SW-SERVE-1, SW-SERVE-2, SW-SERVE-3, SW-SEC-7, SW-ADAPT-2: 24 clients on 3 adapters and
    the base, decoded in mixed steps, each equal to offline generation with log-probabilities
    of the oracle's logits; each answer names only its own adapter and version (no batch
    information); nothing compiles after warmup."""
    server, service = served
    engine = service.engine
    handles = []
    submit = engine.submit

    def recording(request):
        handles.append(submit(request))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording)
    compiles = engine.compile_counts()
    choices = [*NAMES, None]
    bodies = [
        {"tokens": list(PROMPTS[i % 3]), "adapter": choices[i % 4], "max_new_tokens": NEW}
        for i in range(24)
    ]
    bodies[5]["stop"] = [reference(PROMPTS[2], choices[1]).tokens[1]]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        with engine.paused():  # all 24 wait, then share the rows
            futures = [pool.submit(_gen, server.url, b) for b in bodies]
            deadline = time.monotonic() + 60
            while engine.metrics()["waiting"] < 24:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        replies = [f.result() for f in futures]
    for body, (status, reply, headers) in zip(bodies, replies, strict=True):
        name = body["adapter"]
        expected = reference(body["tokens"], name, stop=body.get("stop", ()))
        assert status == 200 and reply["tokens"] == expected.tokens, body
        assert set(reply) == KEYS  # no `batch`: nothing about other requests
        assert reply["adapter"] == (name or "base")
        assert reply["adapter_version"] == headers["x-adapter-version"] == _version(service, name)
        shown = json.dumps({k: v for k, v in reply.items() if k != "text"})
        assert not [n for n in (*NAMES, UNICODE) if n != name and n in shown]
    assert replies[5][1]["finish_reason"] == "stop" and len(replies[5][1]["tokens"]) == 2
    results = [h.result() for h in handles]
    assert max(len(set(r.adapters)) for r in results) >= 3  # adapters and base in one step
    assert max(r.live_rows for r in results) > 1
    bank = jaxlora.AdapterBank()
    for name, adapter in world.adapters.items():
        bank = bank.add(name, adapter)
    for i in (0, 1, 6):  # log-probabilities: log_softmax of the oracle's logits
        body, reply = bodies[i], replies[i][1]
        lora = jaxlora.select(jaxlora.conform(bank), body["adapter"])
        full = np.array([body["tokens"] + reply["tokens"][:-1]])
        logits = forward(world.model, full, lora=lora)
        logp = np.asarray(jax.nn.log_softmax(logits[0, len(body["tokens"]) - 1 :], axis=-1))
        expected = logp[np.arange(len(reply["tokens"])), reply["tokens"]]
        np.testing.assert_allclose(reply["logprobs"], expected, rtol=1e-4, atol=1e-4)
    assert engine.compile_counts() == compiles
    assert sum(compiles.values()) <= len(CONFIG.chunks) + 1


@pytest.mark.clause("SW-ENGINE-1", "SW-ENGINE-2", "SW-SERVE-1")
def test_a_server_on_several_decode_steps_per_call_answers_the_same_tokens(world, reference):
    """SW-ENGINE-1, SW-ENGINE-2, SW-SERVE-1: with `--decode-steps 4` (4 decode steps per
    device call) concurrent mixed-adapter requests get the tokens each gets alone on the
    one-step engine, and the calls did run several steps."""
    engine = Engine(world.model, dataclasses.replace(CONFIG, decode_steps=4), max_adapters=10)
    server = start_server(service_for(world, engine))
    try:
        choices = [*NAMES, None]
        bodies = [
            {"tokens": list(PROMPTS[i % 3]), "adapter": choices[i % 4], "max_new_tokens": 12}
            for i in range(8)
        ]
        replies = _many(server.url, bodies, workers=8)
        for body, (status, reply, _) in zip(bodies, replies, strict=True):
            expected = reference(body["tokens"], body["adapter"], n=12).tokens
            assert status == 200 and reply["tokens"] == expected, body
        counts = engine.metrics()
        assert counts["decode_steps"] > counts["decode_calls"]
    finally:
        server.stop()


@pytest.mark.clause("SW-SERVE-5")
def test_bad_requests_are_refused_without_disturbing_good_ones(world, served, reference):
    """SW-SERVE-5: 400 / 404 / 413 answers naming the field, sent together with good requests;
    `model` (the OpenAI routes' name) and fields /generate does not implement (`max_tokens`,
    `stream`, `n`) are refused, never ignored."""
    server, _ = served
    good = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i % 3], "max_new_tokens": NEW}
            for i in range(6)]  # fmt: skip
    good.append({"text": "hello world", "max_new_tokens": NEW})
    bad = [
        ({"tokens": [1, 2], "adapter": "nope"}, 404, "adapter", "'nope'"),
        ({"tokens": [1, VOCAB]}, 400, "tokens", f"[0, {VOCAB})"),
        ({"tokens": "12"}, 400, "tokens", "list of token ids"),
        ({"text": 5}, 400, "text", "string"),
        ({"tokens": [1], "text": "a"}, 400, "text", "not both"),
        ({"tokens": [1], "max_new_tokens": 0}, 400, "max_new_tokens", "int"),
        ({"tokens": [1], "temperature": -1}, 400, "temperature", "number"),
        ({"tokens": [1], "seed": 2**40}, 400, "seed", "[0, 4294967295]"),
        ({"tokens": [1], "seed": -1}, 400, "seed", "int"),
        ({"tokens": [1], "top_p": 0}, 400, "top_p", "(0, 1]"),
        ({"tokens": [1], "stop": [1] * 9}, 400, "stop", "at most 8"),
        ({"tokens": [1], "metadata": [1]}, 400, "metadata", "object"),
        ({"tokens": [1], "model": "alpha"}, 400, "model", "in `adapter`"),
        ({"tokens": [1], "max_tokens": 3}, 400, "max_tokens", "unknown"),
        ({"tokens": [1], "stream": True}, 400, "stream", "unknown"),
        ({"tokens": [1], "n": 2}, 400, "n", "unknown"),
        ({"tokens": list(range(1, 97))}, 413, None, "limit of 95"),
        ({"tokens": [1, 2], "max_new_tokens": 95}, 413, None, "is 94"),
    ]
    raw_cases = [
        (b'{"tokens": [1,', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b" " * (2 << 20), 413, "above the limit"),
    ]
    json_header = {"Content-Type": "application/json"}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        good_f = [pool.submit(_gen, server.url, b) for b in good]
        bad_f = [pool.submit(_gen, server.url, b) for b, *_ in bad]
        raw_f = [
            pool.submit(http, server.url + "/generate", "POST", None, json_header, raw)
            for raw, *_ in raw_cases
        ]
    for (body, status, param, needle), future in zip(bad, bad_f, strict=True):
        got, reply, _ = future.result()
        error = reply["error"]
        assert (got, error["code"], error["param"]) == (status, status, param), (body, reply)
        assert needle in error["message"], (body, error)
    for (_, status, needle), future in zip(raw_cases, raw_f, strict=True):
        got, _, raw = future.result()
        assert got == status and needle in json.loads(raw)["error"]["message"]
    text = served[1].text
    for body, future in zip(good, good_f, strict=True):
        status, reply, _ = future.result()
        tokens = body.get("tokens") or text.encode(body["text"])
        expected = reference(tokens, body.get("adapter"))
        assert status == 200 and reply["tokens"] == expected.tokens
        assert reply["text"] == text.decode(expected.tokens)
    assert http(server.url + "/health")[0] == 200


@pytest.mark.clause("SW-SERVE-5", "SW-SERVE-11", "SW-OPS-2")
def test_a_full_queue_answers_503_and_admitted_requests_are_correct(world, reference):
    """SW-SERVE-5, SW-SERVE-11, SW-OPS-2: with 3 waiting places and the engine held, 4 of 7
    requests get 503; the 3 admitted ones equal offline generation; the metrics agree with
    the answers; /health says only that the server runs."""
    engine = engine_for(world, max_waiting=3)
    server = start_server(service_for(world, engine))
    try:
        bodies = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i % 3], "max_new_tokens": NEW}
                  for i in range(7)]  # fmt: skip
        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            with engine.paused():
                futures = [pool.submit(_gen, server.url, b) for b in bodies]
                deadline = time.monotonic() + 60
                while sum(f.done() for f in futures) < 4:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            replies = [f.result() for f in futures]
        statuses = [s for s, _, _ in replies]
        assert statuses.count(200) == 3 and statuses.count(503) == 4, statuses
        for body, (status, reply, _) in zip(bodies, replies, strict=True):
            if status == 503:
                assert "retry later" in reply["error"]["message"]
            else:
                assert reply["tokens"] == reference(body["tokens"], body["adapter"]).tokens
        metrics = _metrics(server.url)
        assert (_responses(metrics, 200), _responses(metrics, 503)) == (3, 4)
        generated = sum(
            v for (name, _), v in metrics.items() if name == "jaxlora_generated_tokens_total"
        )
        assert generated == sum(len(r["tokens"]) for s, r, _ in replies if s == 200)
        status, _, raw = http(server.url + "/health")
        assert (status, json.loads(raw)) == (200, {"status": "ok"})
    finally:
        server.stop()


def _admin(url, path, body):
    status, headers, raw = http(url + path, "POST", body)
    text = raw.decode()
    return status, (json.loads(text)["error"]["message"] if status >= 400 else text), headers


@pytest.mark.clause("SW-SERVE-4", "SW-ADAPT-2", "SW-SEC-7")
def test_runtime_loads_while_in_flight_neither_recompile_nor_change_results(
    world, served, reference
):
    """SW-SERVE-4, SW-ADAPT-2, SW-SEC-7: a load during 16 in-flight requests changes none of
    them and compiles nothing; the new adapter serves at once; error statuses; a request
    admitted before its adapter is unloaded keeps that version; the native admin routes
    (`/adapters`, which showed source paths to anyone) are gone."""
    server, service = served
    engine = service.engine
    compiles = engine.compile_counts()
    bodies = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i % 3], "max_new_tokens": NEW}
              for i in range(16)]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        futures = [pool.submit(_gen, server.url, b) for b in bodies]
        loaded = pool.submit(
            _admin, server.url, "/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "late"}
        )
        replies = [f.result() for f in futures]
    status, text, headers = loaded.result()
    assert status == 200 and text.startswith("Success") and headers["x-adapter-version"]
    for body, (status, reply, _) in zip(bodies, replies, strict=True):
        assert (
            status == 200 and reply["tokens"] == reference(body["tokens"], body["adapter"]).tokens
        )
    late = {"tokens": list(PROMPTS[1]), "adapter": "late", "max_new_tokens": NEW}
    status, reply, _ = _gen(server.url, late)
    assert status == 200 and reply["tokens"] == reference(PROMPTS[1], "late").tokens
    assert reply["adapter_version"] == service.registry.get("late").version
    assert engine.compile_counts() == compiles
    for path, body, status, needle in [
        ("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "late"}, 409, "load_inplace"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}, 400, "no adapter"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "wide"}, 400, "rank"),
        ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "adapter path"),
        ("/v1/unload_lora_adapter", {"lora_name": "nope"}, 404, "nope"),
    ]:
        got, message, _ = _admin(server.url, path, body)
        assert (got, needle in message) == (status, True), (body, message)
    version = service.registry.get("late").version
    late_dir = {"lora_path": "late"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        with engine.paused():  # admitted (version pinned), then its name is unloaded
            waiting = engine.metrics()["waiting"]
            queued = pool.submit(_gen, server.url, late)
            while engine.metrics()["waiting"] == waiting:
                time.sleep(0.01)
            assert _admin(server.url, "/v1/unload_lora_adapter", {"lora_name": "late"})[0] == 200
            status, reply, _ = _gen(server.url, late)
            assert status == 404 and reply["error"]["param"] == "adapter"
        status, reply, _ = queued.result()
    assert status == 200 and reply["adapter_version"] == version
    assert reply["tokens"] == reference(PROMPTS[1], "late").tokens
    fill = [f"fill{i}" for i in range(10 - len(engine.adapter_names()))]
    for name in fill:
        assert _admin(server.url, "/v1/load_lora_adapter", late_dir | {"lora_name": name})[0] == 200
    got, message, _ = _admin(server.url, "/v1/load_lora_adapter", late_dir | {"lora_name": "y"})
    assert got == 409 and "limit of 10 adapters" in message
    for name in fill:
        assert _admin(server.url, "/v1/unload_lora_adapter", {"lora_name": name})[0] == 200
    for method, path in (("GET", "/adapters"), ("POST", "/adapters/x"), ("DELETE", "/adapters/x")):
        got, _, raw = http(
            server.url + path, method, {"path": "late"} if method == "POST" else None
        )
        assert got in (404, 405) and json.loads(raw)["error"]["code"] == got
    assert engine.compile_counts() == compiles


def _send_and_close(server, body):
    raw = json.dumps(body).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        time.sleep(0.1)


@pytest.mark.clause("SW-SERVE-6", "SW-ROBUST-3")
def test_a_timeout_is_504_and_a_gone_client_is_dropped(world, served, reference, caplog):
    """SW-SERVE-6, SW-ROBUST-3: a request not served within its `timeout` gets 504; a client
    that goes away while its request waits has it cancelled (counted 499, nothing logged);
    neither fails other requests."""
    server, service = served
    engine = service.engine
    caplog.set_level(logging.INFO)
    before = _metrics(server.url)
    cancelled = engine.metrics()["ended"]["cancelled"]
    with engine.paused():  # both wait for a row: one times out, one's client leaves
        status, reply, _ = _gen(server.url, {"tokens": [1, 2], "timeout": 0.05})
        assert status == 504 and "timeout of 0.05" in reply["error"]["message"]
        _send_and_close(server, {"tokens": [1, 2, 3], "adapter": NAMES[1]})
        deadline = time.monotonic() + 30
        while _responses(_metrics(server.url), 499) == _responses(before, 499):
            assert time.monotonic() < deadline, "the gone client was not noticed"
            time.sleep(0.02)
    while engine.metrics()["ended"]["cancelled"] < cancelled + 2:
        assert time.monotonic() < deadline, "the rows were not cancelled"
        time.sleep(0.02)
    body = {"tokens": [4, 5], "adapter": NAMES[2], "max_new_tokens": 3}
    status, reply, _ = _gen(server.url, body)
    assert status == 200 and reply["tokens"] == reference([4, 5], NAMES[2], 3).tokens
    after = _metrics(server.url)
    assert _responses(after, 504) == _responses(before, 504) + 1
    assert _responses(after, 500) == _responses(before, 500)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.clause("SW-SERVE-7", "SW-SERVE-3")
def test_sampling_depends_only_on_the_request(world, served, reference):
    """SW-SERVE-7, SW-SERVE-3: a seeded sampled request (temperature, top_k, top_p) equals
    offline generation with its sampling parameters, alone and among requests of other
    lengths, adapters and options; no seed: fixed by its `id`; nothing compiles."""
    server, service = served
    compiles = service.engine.compile_counts()
    sampled = {"tokens": [7, 8, 9], "adapter": "gamma", "temperature": 1.5, "top_k": 20,
               "top_p": 0.9, "seed": 11, "max_new_tokens": 6}  # fmt: skip
    status, alone, _ = _gen(server.url, sampled)
    expected = reference((7, 8, 9), "gamma", 6, SamplingParams(1.5, 20, 0.9, 11))
    assert status == 200 and alone["tokens"] == expected.tokens
    rng = np.random.default_rng(0)
    others = [
        {"tokens": rng.integers(0, VOCAB, rng.integers(1, 70)).tolist(),
         "adapter": [None, *NAMES][rng.integers(4)], "max_new_tokens": int(rng.integers(1, 8)),
         "temperature": float(rng.choice([0.0, 0.7])), "top_k": int(rng.integers(0, 10)),
         "top_p": float(rng.choice([1.0, 0.5]))}
        for _ in range(15)
    ]  # fmt: skip
    replies = _many(server.url, [*others[:7], sampled, *others[7:]], workers=16)
    assert replies[7][1]["tokens"] == alone["tokens"]
    for body, (status, reply, _) in zip(others, [*replies[:7], *replies[8:]], strict=True):
        assert status == 200 and len(reply["tokens"]) <= body["max_new_tokens"]
    greedy = _gen(server.url, {k: v for k, v in sampled.items() if k != "temperature"})[1]
    assert greedy["tokens"] == reference((7, 8, 9), "gamma", 6).tokens  # default: greedy
    unseeded = {k: v for k, v in sampled.items() if k != "seed"} | {"id": "fixed-id"}
    assert _gen(server.url, unseeded)[1]["tokens"] == _gen(server.url, unseeded)[1]["tokens"]
    draws = {tuple(_gen(server.url, sampled | {"seed": s})[1]["tokens"]) for s in range(4)}
    assert len(draws) > 1  # the seed matters
    assert service.engine.compile_counts() == compiles


@pytest.mark.clause("SW-SERVE-8", "SW-SEC-6")
def test_the_adapter_comes_from_the_body_the_header_or_the_classifier(served, reference):
    """SW-SERVE-8, SW-SEC-6: the `adapter` field beats the `X-Task-Type` header beats the
    classifier, else the base model; a UTF-8 name is selectable by header as raw UTF-8 bytes or
    RFC 8187 `UTF-8''` percent-encoding; invalid UTF-8 is a 400."""
    server, _ = served
    prompt = list(PROMPTS[0])
    raw = UNICODE.encode().decode("latin-1")  # urllib sends it as the raw UTF-8 bytes
    cases = [
        ({"adapter": "alpha"}, {"X-Task-Type": "beta"}, "alpha", "body"),
        ({"adapter": None}, {"X-Task-Type": "beta"}, None, "body"),
        ({"adapter": "base"}, {}, None, "body"),
        ({"adapter": "tiny"}, {}, None, "body"),  # the served model's name
        ({}, {"X-Task-Type": "beta"}, "beta", "header"),
        ({}, {"X-Task-Type": raw}, UNICODE, "header"),
        ({}, {"X-Task-Type": "UTF-8''" + urllib.parse.quote(UNICODE)}, UNICODE, "header"),
        ({"metadata": {"topic": "gamma"}}, {}, "gamma", "classifier"),
        ({"metadata": {"other": 1}}, {}, None, "classifier"),
    ]
    for extra, headers, adapter, source in cases:
        body = {"tokens": prompt, "max_new_tokens": NEW} | extra
        status, reply, _ = _gen(server.url, body, headers)
        assert status == 200 and reply["route"]["source"] == source, (extra, headers, reply)
        assert reply["adapter"] == (adapter or "base")
        assert reply["tokens"] == reference(prompt, adapter).tokens
    status, reply, _ = _gen(server.url, {"tokens": prompt}, {"X-Task-Type": "\xff\xfe"})
    assert status == 400 and "not valid UTF-8" in reply["error"]["message"]


@pytest.mark.clause("SW-SERVE-9", "SW-SERVE-10")
def test_ab_split_and_fallback_chains(served, reference):
    """SW-SERVE-9, SW-SERVE-10: the arm is fixed by sha256(task, id) and recorded; a fallback
    chain tries its adapters in order, records every attempt with its version, and answers
    the first accepted (here: the last); a request's own `fallback` list skips missing names."""
    server, service = served
    prompt = list(PROMPTS[1])
    arms = set()
    for rid in [f"req-{i}" for i in range(12)]:
        body = {"tokens": prompt, "adapter": "summarize", "id": rid, "max_new_tokens": NEW}
        reply = _gen(server.url, body)[1]
        digest = hashlib.sha256(f"summarize\0{rid}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2.0**64
        arm = "alpha" if point < 0.5 else "beta"
        assert reply["route"]["split"] == {"task": "summarize", "adapter": arm, "point": point}
        assert reply["adapter"] == arm and reply["id"] == rid
        assert reply["tokens"] == reference(prompt, arm).tokens
        assert _gen(server.url, body)[1]["adapter"] == arm
        arms.add(arm)
    assert arms == {"alpha", "beta"}
    reply = _gen(server.url, {"tokens": prompt, "max_new_tokens": NEW}, {"X-Task-Type": "code"})[1]
    attempts = reply["route"]["attempts"]
    assert [a["adapter"] for a in attempts] == ["beta", "gamma", "base"]
    assert [a["version"] for a in attempts] == [
        _version(service, n) for n in ("beta", "gamma", None)
    ]
    assert [a["accepted"] for a in attempts] == [False, False, True]
    assert reply["adapter"] == "base" and reply["tokens"] == reference(prompt, None).tokens
    assert attempts[-1]["confidence"] == pytest.approx(sum(reply["logprobs"]) / NEW)
    explicit = {"tokens": prompt, "max_new_tokens": NEW, "fallback": ["alpha", "missing", "gamma"]}
    chained = _gen(server.url, explicit)[1]
    attempts = chained["route"]["attempts"]
    assert [a["adapter"] for a in attempts] == ["alpha", "missing", "gamma"]
    assert attempts[1] == {"adapter": "missing", "skipped": "not loaded"}
    assert chained["tokens"] == reference(prompt, "gamma").tokens


@pytest.mark.clause("SW-SERVE-13")
def test_a_failing_classifier_is_answered_500_with_json_and_counted(served, reference):
    """SW-SERVE-13: a classifier that raises gets a JSON 500 naming the exception; the metrics
    count it; the server keeps serving."""
    server, _ = served
    before = _metrics(server.url)
    status, reply, _ = _gen(server.url, {"tokens": [1, 2], "metadata": {"explode": True}})
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "RuntimeError: classifier exploded" in reply["error"]["message"]
    status, reply, _ = _gen(server.url, {"tokens": [1, 2], "max_new_tokens": NEW})
    assert status == 200 and reply["tokens"] == reference([1, 2], None).tokens
    assert _responses(_metrics(server.url), 500) == _responses(before, 500) + 1


@pytest.mark.clause("SW-SERVE-6", "SW-SERVE-10")
def test_the_timeout_covers_all_fallback_attempts_together(served):
    """SW-SERVE-6, SW-SERVE-10: a chain whose attempts together outlast `timeout` gets 504."""
    server, _ = served
    body = {"tokens": [1, 2], "max_new_tokens": 2, "fallback": ["alpha", "beta", "base"],
            "metadata": {"slow": True}}  # fmt: skip
    status, reply, _ = _gen(server.url, body | {"timeout": 0.6})
    assert status == 504 and "timeout" in reply["error"]["message"], reply
    status, reply, _ = _gen(server.url, body | {"timeout": 30})
    assert status == 200 and len(reply["route"]["attempts"]) == 3


@pytest.mark.clause("SW-SERVE-9", "SW-SERVE-10", "SW-SERVE-8")
def test_split_and_fallback_parsing():
    """SW-SERVE-9, SW-SERVE-10, SW-SERVE-8: malformed splits/chains are refused; arms are
    fixed per request id; no name, header or classifier: the base model (`default`)."""
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
    plan = RoutingHooks().plan({}, None, "r")
    assert plan.chain == (None,) and plan.route["source"] == "default"


def _serve_args(world, *extra):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    late = f"late={world.root / 'late'}"
    return parser.parse_args(["--model", str(world.model_dir), "--adapter", late, *extra])


@pytest.mark.clause("SW-SERVE-14", "SW-OPS-1")
def test_serve_refuses_a_bad_timeout_and_unknown_routing_adapters(world, capsys):
    """SW-SERVE-14, SW-OPS-1: --timeout <= 0 and --split/--fallback naming unloaded adapters
    fail at start; the engine flags reach the engine's configuration."""
    for bad in ("0", "-1", "inf"):  # refused while parsing the flags: exit 2 naming the flag
        with pytest.raises(SystemExit) as exit_info:
            _serve_args(world, "--timeout", bad)
        assert exit_info.value.code == 2
        assert "--timeout" in capsys.readouterr().err
    args = _serve_args(world, "--split", "t=late:0.5,typo:0.5", "--fallback", "c=late,gone,base")
    with pytest.raises(ConfigError, match=r"'gone', 'typo' that are not loaded\. Loaded: 'late'"):
        serve_command.build_service(args)
    assert serve_command.run(args) == 2
    flags = ("--prefill-tokens", "32", "--routing", "gather", "--cache-dtype", "bfloat16")
    flags += ("--decode-steps", "4")
    service = serve_command.build_service(
        _serve_args(world, "--split", "t=late:0.5,base:0.5", "--rows", "3", *flags)
    )
    assert {n.split("@")[0] for n in service.engine.adapter_names()} == {"late"}
    assert service.timeout_s == _serve_args(world).timeout  # the documented default
    config = service.engine.config
    assert (config.rows, config.prefill_tokens, config.routing, config.cache_dtype) == (
        3,
        32,
        "gather",
        "bfloat16",
    )
    assert config.decode_steps == 4 and _serve_args(world).decode_steps == 1
