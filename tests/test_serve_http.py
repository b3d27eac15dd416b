"""The real HTTP server on 127.0.0.1 with a real client (specs/serving.md, SW-SERVE-*)."""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import socket
import time
import urllib.error
import urllib.request

import jax
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import jaxlora
from jaxlora.commands import serve as serve_command
from jaxlora.errors import ConfigError
from jaxlora.generate import generate
from jaxlora.models import Llama, LlamaConfig
from jaxlora.serve import (
    Buckets,
    Engine,
    RoutingHooks,
    ServerThread,
    Service,
    create_app,
    parse_fallback,
    parse_split,
)

CONFIG = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
BUCKETS = Buckets(batch_sizes=(1, 8, 32), prompt_lengths=(8,), max_new_tokens=6)
NAMES = [f"task{i}" for i in range(8)]
PROMPTS = [(1, 5, 9), (3, 60, 7, 22, 41, 8), (2, 2, 2, 2, 2, 2, 2, 2)]
NEW = 4


def _adapter(i: int, shapes, rank: int):
    targets = [["q_proj", "v_proj"], "all-linear", ["gate_proj", "down_proj"], ["o_proj"]][i % 4]
    cfg = jaxlora.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
    )
    adapter = jaxlora.init_adapter(jax.random.key(100 + i), cfg, shapes)
    # larger B so that adapters visibly change the greedy tokens of a random tiny model
    return {p: dataclasses.replace(w, b=w.b * 40.0) for p, w in adapter.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = Llama.random(CONFIG, seed=3)
    shapes = model.lora_shapes()
    bank = jaxlora.AdapterBank()
    for i, name in enumerate(NAMES):
        bank = bank.add(name, _adapter(i, shapes, 2 + i % 3))
    late = _adapter(9, shapes, 4)
    jaxlora.io.save_peft(root / "late", late)
    jaxlora.io.save_peft(root / "wide", _adapter(10, shapes, 8))  # rank above the bank's
    engine = Engine(model, capacity=10, rank=4, buckets=BUCKETS, max_adapters=10)
    for name in NAMES:
        engine.load(name, bank[name])
    engine.warmup()
    return {"model": model, "bank": bank, "late": late, "root": root, "engine": engine,
            "references": {}}  # fmt: skip


def _serve(world, **kwargs):
    service = Service(world["engine"], **{"window_s": 0.05} | kwargs)
    return ServerThread(create_app(service)).start(), service


@pytest.fixture(scope="module")
def server(world):
    srv, service = _serve(world, hooks=RoutingHooks(classifier=lambda body: body.get("topic")))
    yield srv, service
    srv.stop()


def _call(url, method="GET", body=None, headers=None, raw: bytes | None = None, timeout=120):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _gen(url, body, headers=None):
    return _call(url + "/generate", "POST", body, headers)


def _many(url, bodies, workers=64):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: _gen(url, b), bodies))


def _reference(world, tokens, adapter, new=NEW, stop=()):
    """Tokens of jaxlora.generate on this request alone (memoized per world)."""
    key = (tuple(tokens), adapter, new, tuple(stop))
    if key not in world["references"]:
        lora = jaxlora.select(jaxlora.conform(world["bank"]), adapter)
        out = generate(
            world["model"], [list(tokens)], lora=lora, max_new_tokens=new, stop_tokens=list(stop)
        )
        world["references"][key] = out.rows()[0]
    return world["references"][key]


def _metrics(url):
    return _call(url + "/metrics")[1]


@pytest.mark.clause("SW-SERVE-1", "SW-SERVE-2", "SW-SERVE-3")
def test_64_concurrent_clients_on_8_adapters_match_single_request_reference(world, server):
    """SW-SERVE-1, SW-SERVE-2, SW-SERVE-3:
    64 clients on 8 adapters + base; each equals generate() alone."""
    srv, _ = server
    before = _metrics(srv.url)
    choices = [*NAMES, None]
    bodies = [
        {"tokens": list(PROMPTS[i % 3]), "adapter": choices[i % 9], "max_new_tokens": NEW}
        for i in range(64)
    ]
    bodies[5]["stop"] = [_reference(world, PROMPTS[5 % 3], choices[5])[1]]
    replies = _many(srv.url, bodies)
    assert [s for s, _ in replies] == [200] * 64
    distinct = set()
    for body, (_, reply) in zip(bodies, replies, strict=True):
        expected = _reference(world, body["tokens"], body["adapter"], stop=body.get("stop", ()))
        assert reply["tokens"] == expected, body
        assert reply["adapter"] == body["adapter"]
        distinct.add(tuple(sorted(map(str, reply["batch"]["adapters"]))))
    assert replies[5][1]["finish_reason"] == "stop" and len(replies[5][1]["tokens"]) <= 2
    after = _metrics(srv.url)
    batches = after["batches"]["count"] - before["batches"]["count"]
    assert 1 <= batches < 64, "requests were not batched"
    assert after["batches"]["mixed"] > before["batches"]["mixed"]
    assert max(len(d) for d in distinct) > 2  # rows on several adapters (and base) together
    assert max(r["batch"]["rows"] for _, r in replies) > 1
    assert after["compile_count"] <= len(BUCKETS.batch_sizes) * len(BUCKETS.prompt_lengths)
    assert after["compile_count"] == before["compile_count"]  # warmed up: nothing new


@pytest.mark.clause("SW-SERVE-5")
def test_bad_requests_are_refused_without_disturbing_good_ones(world, server):
    """SW-SERVE-5: 400/404/413 answers, sent together with good requests in one window."""
    srv, _ = server
    good = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i], "max_new_tokens": NEW}
            for i in range(6)]  # fmt: skip
    bad = [
        ({"tokens": [1, 2], "adapter": "nope"}, 404, "nope"),
        ({"tokens": [1, 64]}, 400, "[0, 64)"),
        ({"tokens": [1, -1], "adapter": NAMES[0]}, 400, "[0, 64)"),
        ({"tokens": "12"}, 400, "`tokens`"),
        ({"text": "hello"}, 400, "tokenizer"),
        ({"tokens": [1], "max_new_tokens": 0}, 400, "max_new_tokens"),
        ({"tokens": [1], "temperature": -1}, 400, "temperature"),
        ({"tokens": [1], "seed": 2**40}, 400, "`seed` must be an int in [0, 4294967296)"),
        ({"tokens": [1], "seed": -1}, 400, "`seed`"),
        ({"tokens": list(range(9))}, 413, "limit of 8"),
        ({"tokens": [1], "max_new_tokens": 7}, 413, "limit of 6"),
    ]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        good_f = [pool.submit(_gen, srv.url, b) for b in good]
        bad_f = [pool.submit(_gen, srv.url, b) for b, _, _ in bad]
        malformed = pool.submit(_call, srv.url + "/generate", "POST", raw=b'{"tokens": [1,')
        not_object = pool.submit(_call, srv.url + "/generate", "POST", raw=b"[1, 2]")
        huge = pool.submit(_call, srv.url + "/generate", "POST", raw=b" " * (2 << 20))
    for (body, status, needle), fut in zip(bad, bad_f, strict=True):
        got_status, reply = fut.result()
        assert (got_status, needle in reply["error"]) == (status, True), (body, reply)
    assert bad_f[0].result()[1]["adapters"] == ["base", *sorted(NAMES)]
    assert malformed.result()[0] == 400 and "not valid JSON" in malformed.result()[1]["error"]
    assert not_object.result()[0] == 400 and "JSON object" in not_object.result()[1]["error"]
    assert huge.result()[0] == 413
    for body, fut in zip(good, good_f, strict=True):
        status, reply = fut.result()
        assert status == 200 and reply["tokens"] == _reference(
            world, body["tokens"], body["adapter"]
        )
    assert _call(srv.url + "/health")[1]["status"] == "ok"


@pytest.mark.clause("SW-SERVE-5", "SW-SERVE-11")
def test_full_queue_answers_503_and_admitted_requests_are_correct(world):
    """SW-SERVE-5, SW-SERVE-11: with max_pending=3 and the engine held, the surplus gets 503."""
    srv, service = _serve(world, window_s=1.5, max_pending=3)
    try:
        bodies = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i]} for i in range(7)]
        with concurrent.futures.ThreadPoolExecutor(7) as pool:
            with service.engine.core.paused():  # nothing is admitted: 3 wait, 4 are refused
                futures = [pool.submit(_gen, srv.url, b | {"max_new_tokens": NEW}) for b in bodies]
                while _metrics(srv.url)["requests"].get("rejected_queue_full", 0) < 4:
                    time.sleep(0.01)
            replies = [f.result() for f in futures]
        statuses = [s for s, _ in replies]
        assert statuses.count(200) == 3 and statuses.count(503) == 4, statuses
        for body, (status, reply) in zip(bodies, replies, strict=True):
            if status == 503:
                assert "max_pending=3" in reply["error"]
            else:
                assert reply["tokens"] == _reference(world, body["tokens"], body["adapter"])
        metrics = _metrics(srv.url)
        assert metrics["requests"]["rejected_queue_full"] == 4
        assert metrics["requests"]["served"] == 3
        assert metrics["responses"] == {"200": 3, "503": 4}
        assert metrics["batches"]["count"] == 1 and metrics["batches"]["sizes"] == {"3": 1}
        assert metrics["tokens"]["generated"] == sum(
            len(r["tokens"]) for _, r in replies if r.get("tokens")
        )
    finally:
        srv.stop()


@pytest.mark.clause("SW-SERVE-4")
def test_load_while_in_flight_neither_retraces_nor_changes_results(world, server):
    """SW-SERVE-4: POST /adapters during 32 in-flight requests; DELETE; error codes."""
    srv, service = server
    count = service.engine.compile_count()
    bodies = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i % 8], "max_new_tokens": NEW}
              for i in range(32)]  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(33) as pool:
        futures = [pool.submit(_gen, srv.url, b) for b in bodies]
        loaded = pool.submit(
            _call, srv.url + "/adapters/late", "POST", {"path": str(world["root"] / "late")}
        )
        replies = [f.result() for f in futures]
    assert loaded.result() == (201, {"name": "late", "version": 9})
    for body, (status, reply) in zip(bodies, replies, strict=True):
        assert status == 200 and reply["tokens"] == _reference(
            world, body["tokens"], body["adapter"]
        )
    listing = _call(srv.url + "/adapters")[1]
    assert {a["name"] for a in listing["adapters"]} == {*NAMES, "late"}
    assert listing["free_slots"] == 2  # 10 device slots, the 8 adapters used so far resident
    status, reply = _gen(
        srv.url, {"tokens": list(PROMPTS[1]), "adapter": "late", "max_new_tokens": NEW}
    )
    bank = world["bank"].add("late", world["late"])
    lora = jaxlora.select(jaxlora.conform(bank), "late")
    expected = generate(world["model"], [list(PROMPTS[1])], lora=lora, max_new_tokens=NEW)
    assert status == 200 and reply["tokens"] == expected.rows()[0]
    assert service.engine.compile_count() == count
    errors = [
        ("POST", "/adapters/late", {"path": str(world["root"] / "late")}, 409, "already loaded"),
        ("POST", "/adapters/x", {"path": str(world["root"] / "missing")}, 400, "no such"),
        ("POST", "/adapters/x", {"path": str(world["root"] / "wide")}, 400, "rank 8"),
        ("POST", "/adapters/x", {"dir": "?"}, 400, '"path"'),
        ("DELETE", "/adapters/nope", None, 404, "nope"),
    ]
    for method, path, body, status, needle in errors:
        got, reply = _call(srv.url + path, method, body)
        assert (got, needle in reply["error"]) == (status, True), (path, reply)
    assert _call(srv.url + "/adapters/late", "DELETE") == (200, {"name": "late", "version": 9})
    status, reply = _gen(srv.url, {"tokens": [1], "adapter": "late"})
    assert status == 404 and "late" not in reply["adapters"]
    late_dir = {"path": str(world["root"] / "late")}
    assert _call(srv.url + "/adapters/a", "POST", late_dir)[0] == 201
    assert _call(srv.url + "/adapters/b", "POST", late_dir)[0] == 201
    got, reply = _call(srv.url + "/adapters/c", "POST", late_dir)
    assert got == 409 and "limit of 10 adapters" in reply["error"]
    assert _call(srv.url + "/adapters/a", "DELETE")[0] == 200
    assert _call(srv.url + "/adapters/b", "DELETE")[0] == 200
    assert service.engine.compile_count() == count


@pytest.mark.clause("SW-SERVE-6", "SW-SERVE-11")
def test_timeout_and_client_disconnect_drop_the_request(world):
    """SW-SERVE-6, SW-SERVE-11:
    504 past the timeout; a closed connection is dropped before it runs."""
    srv, service = _serve(world, window_s=0.6)
    try:
        with service.engine.core.paused():  # both wait for a row: one times out, one leaves
            status, reply = _gen(srv.url, {"tokens": [1, 2], "timeout": 0.05})
            assert status == 504 and "timeout" in reply["error"]
            body = json.dumps({"tokens": [1, 2, 3], "adapter": NAMES[1]}).encode()
            with socket.create_connection((srv.host, srv.port)) as sock:
                sock.sendall(
                    b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                time.sleep(0.1)
            time.sleep(1.0)
        status, reply = _gen(srv.url, {"tokens": [4, 5], "adapter": NAMES[2], "max_new_tokens": 3})
        assert status == 200 and reply["tokens"] == _reference(world, [4, 5], NAMES[2], new=3)
        requests = _metrics(srv.url)["requests"]
        assert requests["client_disconnected"] == 1 and requests["cancelled"] >= 1
        assert requests["timed_out"] == 1 and requests["served"] == 1
    finally:
        srv.stop()


@pytest.mark.clause("SW-SERVE-7")
def test_sampling_depends_only_on_the_request(world, server):
    """SW-SERVE-7: a seeded sampled request gets the same tokens alone and in a busy batch."""
    srv, _ = server
    sampled = {"tokens": [7, 8, 9], "adapter": NAMES[3], "temperature": 1.5, "top_k": 20,
               "seed": 11, "max_new_tokens": 6}  # fmt: skip
    _, alone = _gen(srv.url, sampled)
    others = [{"tokens": list(PROMPTS[i % 3]), "adapter": NAMES[i % 8], "temperature": 0.7,
               "max_new_tokens": 5} for i in range(15)]  # fmt: skip
    replies = _many(srv.url, [*others[:7], sampled, *others[7:]], workers=16)
    assert replies[7][1]["tokens"] == alone["tokens"] and replies[7][1]["batch"]["rows"] > 1
    greedy = _gen(srv.url, sampled | {"temperature": 0})[1]["tokens"]
    assert greedy == _reference(world, sampled["tokens"], NAMES[3], new=6)
    draws = {tuple(_gen(srv.url, sampled | {"seed": s})[1]["tokens"]) for s in range(4)}
    assert len(draws) > 1  # the seed matters


@pytest.mark.clause("SW-SERVE-8")
def test_adapter_from_body_header_classifier_or_base(world, server):
    """SW-SERVE-8: body field beats header beats classifier; else the base model."""
    srv, _ = server
    prompt = list(PROMPTS[0])
    cases = [
        ({"adapter": NAMES[1]}, {"X-Task-Type": NAMES[2]}, NAMES[1], "body"),
        ({"adapter": None}, {"X-Task-Type": NAMES[2]}, None, "body"),
        ({"adapter": "base"}, {}, None, "body"),
        ({}, {"X-Task-Type": NAMES[2]}, NAMES[2], "header"),
        ({"topic": NAMES[4]}, {}, NAMES[4], "classifier"),
        ({}, {}, None, "classifier"),
    ]
    for extra, headers, adapter, source in cases:
        status, reply = _gen(srv.url, {"tokens": prompt, "max_new_tokens": NEW} | extra, headers)
        assert status == 200 and reply["route"]["source"] == source, reply
        assert reply["adapter"] == adapter
        assert reply["tokens"] == _reference(world, prompt, adapter)
    srv2, _ = _serve(world)
    try:
        reply = _gen(srv2.url, {"tokens": prompt, "max_new_tokens": NEW})[1]
        assert reply["route"]["source"] == "default" and reply["adapter"] is None
    finally:
        srv2.stop()


@pytest.mark.clause("SW-SERVE-9", "SW-SERVE-10")
def test_ab_split_and_fallback_chain(world):
    """SW-SERVE-9, SW-SERVE-10:
    arms fixed by sha256(task, id), recorded; fallback tries in order."""
    split = parse_split(f"summarize={NAMES[0]}:0.5,{NAMES[1]}:0.5")
    hooks = RoutingHooks(
        splits=[split],
        fallbacks=[parse_fallback(f"code={NAMES[2]},{NAMES[3]},base")],
        min_confidence=1.0,  # log-probabilities are <= 0: only the last attempt is accepted
    )
    srv, _ = _serve(world, hooks=hooks)
    try:
        prompt = list(PROMPTS[1])
        arms = {}
        for rid in [f"req-{i}" for i in range(12)]:
            body = {"tokens": prompt, "adapter": "summarize", "id": rid, "max_new_tokens": NEW}
            reply = _gen(srv.url, body)[1]
            digest = hashlib.sha256(f"summarize\0{rid}".encode()).digest()
            point = int.from_bytes(digest[:8], "big") / 2.0**64
            arm = NAMES[0] if point < 0.5 else NAMES[1]
            assert reply["route"]["split"] == {"task": "summarize", "adapter": arm, "point": point}
            assert reply["adapter"] == arm and reply["id"] == rid
            assert reply["tokens"] == _reference(world, prompt, arm)
            again = _gen(srv.url, body)[1]
            assert again["adapter"] == arm
            arms[rid] = arm
        assert set(arms.values()) == {NAMES[0], NAMES[1]}
        reply = _gen(srv.url, {"tokens": prompt, "max_new_tokens": NEW}, {"X-Task-Type": "code"})[1]
        attempts = reply["route"]["attempts"]
        assert [a["adapter"] for a in attempts] == [NAMES[2], NAMES[3], None]
        assert [a["accepted"] for a in attempts] == [False, False, True]
        assert reply["adapter"] is None and reply["tokens"] == _reference(world, prompt, None)
        assert attempts[-1]["confidence"] == pytest.approx(sum(reply["logprobs"]) / NEW)
        explicit = {"tokens": prompt, "max_new_tokens": NEW, "fallback": [NAMES[5], NAMES[6]]}
        chained = _gen(srv.url, explicit)[1]
        assert [a["adapter"] for a in chained["route"]["attempts"]] == [NAMES[5], NAMES[6]]
        assert chained["tokens"] == _reference(world, prompt, NAMES[6])
    finally:
        srv.stop()


@pytest.mark.clause("SW-SERVE-13")
def test_a_failing_classifier_is_answered_500_with_json_and_counted(world):
    """SW-SERVE-13: a classifier that raises gets a JSON 500 naming the error; metrics count it."""

    def classifier(body):
        if body.get("explode"):
            raise RuntimeError("classifier exploded")
        return None

    srv, _ = _serve(world, hooks=RoutingHooks(classifier=classifier))
    try:
        status, reply = _gen(srv.url, {"tokens": [1, 2], "explode": True})
        assert status == 500 and reply["type"] == "RuntimeError"
        assert "RuntimeError: classifier exploded" in reply["error"]
        status, reply = _gen(srv.url, {"tokens": [1, 2], "max_new_tokens": NEW})
        assert status == 200 and reply["tokens"] == _reference(world, [1, 2], None)
        assert _metrics(srv.url)["responses"] == {"200": 1, "500": 1}
    finally:
        srv.stop()


@pytest.mark.clause("SW-SERVE-6", "SW-SERVE-10")
def test_the_timeout_covers_all_fallback_attempts_together(world):
    """SW-SERVE-6, SW-SERVE-10: a chain whose attempts together outlast `timeout` gets 504."""

    def slow_confidence(body, result):
        time.sleep(0.4)
        return -1.0

    hooks = RoutingHooks(
        fallbacks=[parse_fallback(f"code={NAMES[2]},{NAMES[3]},base")],
        confidence=slow_confidence,
        min_confidence=0.0,
    )
    srv, _ = _serve(world, hooks=hooks)
    try:
        body = {"tokens": [1, 2], "adapter": "code", "max_new_tokens": 2}
        status, reply = _gen(srv.url, body | {"timeout": 0.6})
        assert status == 504 and "timeout of 0.6" in reply["error"], reply
        status, reply = _gen(srv.url, body | {"timeout": 30})
        assert status == 200 and len(reply["route"]["attempts"]) == 3
    finally:
        srv.stop()


def _serve_args(world, *extra):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    late = f"late={world['root'] / 'late'}"
    return parser.parse_args(["--model", str(world["root"]), "--adapter", late, *extra])


@pytest.mark.clause("SW-SERVE-14")
def test_serve_refuses_a_bad_timeout_and_unknown_routing_adapters(world, monkeypatch, capsys):
    """SW-SERVE-14: --timeout <= 0 and --split/--fallback naming unloaded adapters fail at start."""
    monkeypatch.setattr(jaxlora.models, "load_llama", lambda directory: world["model"])
    for bad in ("0", "-1", "inf"):  # refused while parsing the flags: exit 2 naming the flag
        with pytest.raises(SystemExit) as exit_info:
            _serve_args(world, "--timeout", bad)
        assert exit_info.value.code == 2
        assert "--timeout" in capsys.readouterr().err
    args = _serve_args(world, "--split", "t=late:0.5,typo:0.5", "--fallback", "c=late,gone,base")
    with pytest.raises(ConfigError, match=r"'gone', 'typo' that are not loaded\. Loaded: 'late'"):
        serve_command.build_service(args)
    assert serve_command.run(args) == 2
    service = serve_command.build_service(_serve_args(world, "--split", "t=late:0.5,base:0.5"))
    assert {n.split("@")[0] for n in service.engine.adapter_names()} == {"late"}
    assert service.timeout_s == _serve_args(world).timeout  # the documented default
