"""Robustness of the OpenAI server (SW-ROBUST-*, SW-ADAPT-*, SW-OPS-2): non-finite rows,
fallback chains past missing and failing adapters, the load-time magnitude bound, versions
pinned across a same-name reload, client disconnects, Prometheus metrics."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import socket
import time

import pytest

pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

import jax.numpy as jnp
import openai
from openai_support import (
    build_world,
    client,
    engine_for,
    http,
    service_for,
    start_server,
    tiny_adapter,
)
from prometheus_client.parser import text_string_to_metric_families

import jaxlora
from jaxlora.engine import Request
from jaxlora.serve.errors import BadRequestError
from jaxlora.serve.hooks import RoutingHooks
from jaxlora.serve.registry import content_hash
from jaxlora.serve.security import Policy

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("robust"))


def _scaled(adapter, factor):
    return {p: dataclasses.replace(w, b=w.b * factor) for p, w in adapter.items()}


def _server(world, hooks=None, nan_adapter=False):
    engine = engine_for(world)
    engine.warmup()
    policy = Policy(allow_unauthenticated_admin=True)
    service = service_for(
        world, engine, hooks=hooks or RoutingHooks(), policy=policy, runtime_loading=True
    )
    if nan_adapter:  # lora_alpha 1e38: finite weights whose update overflows to Inf, then NaN
        service.registry.max_delta = math.inf  # let it in (the bound is tested apart)
        nan_making = {
            p: dataclasses.replace(w, scale=jnp.asarray(1e38, jnp.float32))
            for p, w in world.adapters["alpha"].items()
        }
        service.registry.add("huge", nan_making)
        service.registry.max_delta = 1e4
    return start_server(service), service


@pytest.fixture(scope="module")
def nan_served(world):
    """A server holding an adapter that makes NaN logits, apart from the other tests' server
    (its rows may keep NaN in their KV cache; see test_a_non_finite_row_leaves_nothing_behind)."""
    hooks = RoutingHooks(fallbacks=[("code", ("huge", "missing", "beta"))])
    server, service = _server(world, hooks, nan_adapter=True)
    yield server, service
    server.stop()


@pytest.fixture(scope="module")
def served(world):
    server, service = _server(world)
    yield server, service
    server.stop()


@pytest.fixture(scope="module")
def reference(world):
    engine = engine_for(world)
    added = set()

    def run(tokens, adapter_name, adapter, n, stop=(1,)):
        if adapter_name is not None and adapter_name not in added:
            engine.add_adapter(adapter_name, adapter)
            added.add(adapter_name)
        request = Request(tuple(tokens), n, adapter=adapter_name, stop_tokens=stop)
        return engine.generate([request])[0]

    return run


def _metrics(url):
    _, _, raw = http(url + "/metrics")
    out = {}
    for family in text_string_to_metric_families(raw.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.clause("SW-ROBUST-1")
def test_a_non_finite_row_gets_a_clear_error_and_its_batch_mates_are_served(
    nan_served, world, reference
):
    """SW-ROBUST-1: requests on an adapter whose logits are NaN/Inf get 422 naming the adapter
    (never 500, never tokens with 200), while requests decoded next to them are exact."""
    server, service = nan_served
    c, text = client(server.url), service.text
    prompt = text.encode(PROMPT)

    def call(model):
        try:
            out = c.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=6,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            return out.choices[0].token_ids
        except openai.APIStatusError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, ["huge", "alpha", "huge", "beta", "alpha", "huge"]))
    for model, got in zip(["huge", "alpha", "huge", "beta", "alpha", "huge"], results, strict=True):
        if model == "huge":
            assert isinstance(got, openai.UnprocessableEntityError), got
            assert "under adapter 'huge' were not finite" in got.message
        else:
            assert got == reference(prompt, model, world.adapters[model], 6).tokens


@pytest.mark.clause("SW-ROBUST-1")
def test_a_non_finite_row_leaves_nothing_behind(nan_served, world, reference):
    """SW-ROBUST-1: after NaN requests, every row of the engine serves exact tokens again."""
    server, service = nan_served
    c = client(server.url)
    for _ in range(2 * service.engine.config.rows):
        with pytest.raises(openai.UnprocessableEntityError):
            c.completions.create(model="huge", prompt=PROMPT, max_tokens=2, temperature=0)
    prompt = service.text.encode(PROMPT)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(
            pool.map(
                lambda _: (
                    c.completions.create(
                        model="beta",
                        prompt=PROMPT,
                        max_tokens=4,
                        temperature=0,
                        extra_body={"return_token_ids": True},
                    )
                    .choices[0]
                    .token_ids
                ),
                range(8),
            )
        )
    assert outs == [reference(prompt, "beta", world.adapters["beta"], 4).tokens] * 8


@pytest.mark.clause("SW-ROBUST-2")
def test_a_fallback_chain_skips_missing_and_non_finite_adapters(nan_served, world, reference):
    """SW-ROBUST-2: the chain `huge, missing, beta` is answered by beta (tokens exact); the
    choice records the failed and the skipped attempts."""
    server, service = nan_served
    out = client(server.url).completions.create(
        model="code",
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    assert choice.adapter == "beta"
    expected = reference(service.text.encode(PROMPT), "beta", world.adapters["beta"], 5)
    assert choice.token_ids == expected.tokens
    assert [a["adapter"] for a in choice.attempts] == ["huge", "missing", "beta"]
    assert choice.attempts[0]["error"] == "non-finite logits"
    assert choice.attempts[1]["skipped"] == "not loaded" and choice.attempts[2]["accepted"]


@pytest.mark.clause("SW-ADAPT-3")
def test_the_magnitude_bound_refuses_huge_weights_and_alpha_at_load(served, world):
    """SW-ADAPT-3: weights x1e30 and lora_alpha 1e38 are refused when loaded (400 naming the
    bound), so they never reach a row; nothing is added."""
    server, service = served
    with pytest.raises(BadRequestError, match=r"can reach .* above this server's bound of 10000"):
        service.registry.add("big", _scaled(world.adapters["alpha"], 1e30))
    alpha = {
        p: dataclasses.replace(w, scale=jnp.asarray(1e38 / w.rank, jnp.float32))
        for p, w in world.adapters["beta"].items()
    }
    jaxlora.io.save_peft(world.root / "alpha1e38", alpha)
    status, _, raw = http(
        server.url + "/v1/load_lora_adapter", "POST", {"lora_name": "big", "lora_path": "alpha1e38"}
    )
    assert status == 400 and "--max-adapter-delta" in json.loads(raw)["error"]["message"]
    assert service.registry.get("big") is None


@pytest.mark.clause("SW-ADAPT-2")
def test_a_same_name_reload_keeps_the_version_requests_were_admitted_with(served, world, reference):
    """SW-ADAPT-2: a request admitted before `alpha` is replaced finishes with the old weights
    and names the old version; requests after get the new version and its tokens."""
    server, service = served
    c, text = client(server.url), service.text
    prompt = text.encode(PROMPT)
    old = world.adapters["alpha"]
    new = tiny_adapter(world.model, 7)
    jaxlora.io.save_peft(world.root / "alpha_v2", new)
    stream = c.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "stop_token_ids": [0]},
    )
    it = iter(stream)
    first = next(it)
    status, headers, _ = http(
        server.url + "/v1/load_lora_adapter",
        "POST",
        {"lora_name": "alpha", "lora_path": "alpha_v2", "load_inplace": True},
    )
    assert status == 200 and headers["x-adapter-version"] == content_hash(
        jaxlora.io.load_peft_adapter(world.root / "alpha_v2")[0]
    )
    chunks = [first, *it]
    ids = [t for ch in chunks if ch.choices for t in (ch.choices[0].token_ids or [])]
    assert {ch.choices[0].adapter_version for ch in chunks if ch.choices} == {content_hash(old)}
    assert ids == reference(prompt, "alpha", old, 40, stop=(0, 1)).tokens
    after = c.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert after.choices[0].adapter_version == headers["x-adapter-version"]
    assert after.choices[0].token_ids == reference(prompt, "alpha_v2", new, 8).tokens
    assert service.registry.in_use() == {}  # the old version left the engine
    assert f"alpha@{content_hash(old)[7:23]}" not in service.engine.adapter_names()


def _send(url, body):
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw)
    )
    return sock


@pytest.mark.clause("SW-ROBUST-3")
def test_a_client_disconnect_is_not_a_500_and_logs_no_traceback(served, caplog):
    """SW-ROBUST-3: clients that go away (streaming or not) have their rows cancelled, are
    counted as 499, and nothing is logged as an error; the server keeps serving."""
    server, service = served
    before = _metrics(server.url)
    cancelled = service.engine.metrics()["ended"]["cancelled"]
    caplog.set_level(logging.INFO)
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 80, "temperature": 0, "extra": None}
    body.pop("extra")
    sock = _send(server.url, body | {"stream": True})
    assert sock.recv(64).startswith(b"HTTP/1.1 200")
    sock.close()
    _send(server.url, body).close()
    deadline = time.monotonic() + 60
    while service.engine.metrics()["ended"]["cancelled"] < cancelled + 2:
        assert time.monotonic() < deadline, "the rows of gone clients were not cancelled"
        time.sleep(0.05)
    out = client(server.url).completions.create(model="beta", prompt=PROMPT, max_tokens=2)
    assert len(out.choices) == 1
    after = _metrics(server.url)
    key = ("jaxlora_responses_total", (("endpoint", "/v1/completions"), ("status", "500")))
    assert after.get(key, 0) == before.get(key, 0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert "Future exception was never retrieved" not in caplog.text


@pytest.mark.clause("SW-OPS-2")
def test_prometheus_metrics_count_requests_tokens_latency_slots_and_errors(served):
    """SW-OPS-2: /metrics (Prometheus text) counts per adapter requests, generated tokens and
    latency/queue histograms, responses by status, and the engine's slot hits/misses."""
    server, _ = served
    before = _metrics(server.url)
    c = client(server.url)
    outs = [
        c.completions.create(model="gamma", prompt=PROMPT, max_tokens=3, temperature=0)
        for _ in range(3)
    ]
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt=PROMPT)
    after = _metrics(server.url)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("jaxlora_requests_total", adapter="gamma", endpoint="/v1/completions") == 3
    tokens = sum(o.usage.completion_tokens for o in outs)
    assert delta("jaxlora_generated_tokens_total", adapter="gamma") == tokens
    assert delta("jaxlora_request_latency_seconds_count", adapter="gamma") == 3
    assert delta("jaxlora_queue_seconds_count", adapter="gamma") == 3
    assert delta("jaxlora_responses_total", endpoint="/v1/completions", status="200") == 3
    assert delta("jaxlora_responses_total", endpoint="/v1/completions", status="404") == 1
    hits, misses = (
        delta("jaxlora_adapter_slot_hits_total"),
        delta("jaxlora_adapter_slot_misses_total"),
    )
    assert hits + misses == 3 and after[("jaxlora_adapter_slot_swap_ins_total", ())] >= 1
