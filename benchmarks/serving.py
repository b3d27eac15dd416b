"""Serving throughput: dynamic mixed batching vs one request at a time with a switch per request.

Starts the real HTTP server (`jaxlora serve`'s app, native `POST /generate`) on 127.0.0.1 in
this process, sends requests from 1, 8 and 32 concurrent clients (each request on one of 8
adapters or the base model, chosen at random) and reports requests/s and generated tokens/s.
Baselines, measured in the same run:

- `sequential switch`: the seed's pattern 1 done naively: one request at a time in-process,
  `generate(model, [prompt], lora=jaxlora.select(jaxlora.conform(bank), name))`, i.e. select
  the request's adapter and generate; already jit-compiled for every prompt length (a
  generous baseline: no HTTP);
- `server, batch 1`: the same HTTP server with an engine of one row, 32 clients.

Numbers are ratios measured in one run on this machine; nothing here is asserted.

Example:
    $ python -m benchmarks.serving --requests 96 --json serving.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import time
import urllib.request

import jax
import numpy as np

import jaxlora
from jaxlora.engine import Engine, EngineConfig
from jaxlora.generate import generate
from jaxlora.models import Llama, LlamaConfig
from jaxlora.serve import OpenAIService, ServerThread, create_app

CONFIG = LlamaConfig(256, 64, 128, 2, 4, 2, 16)
ADAPTERS = [f"task{i}" for i in range(8)]


def _setup(seed: int = 0):
    model = Llama.random(CONFIG, seed=seed)
    shapes = model.lora_shapes()
    bank = jaxlora.AdapterBank()
    for i, name in enumerate(ADAPTERS):
        cfg = jaxlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)  # fmt: skip
        bank = bank.add(name, jaxlora.init_adapter(jax.random.key(i), cfg, shapes))
    return model, bank


def _requests(n: int, new: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    choices = [*ADAPTERS, None]
    return [
        {
            "tokens": rng.integers(1, CONFIG.vocab_size, rng.integers(4, 17)).tolist(),
            "adapter": choices[rng.integers(len(choices))],
            "max_new_tokens": new,
        }
        for _ in range(n)
    ]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _load(url: str, engine: Engine, requests: list[dict], clients: int) -> dict:
    before = engine.metrics()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        replies = list(pool.map(lambda b: _post(url, b), requests))
    seconds = time.perf_counter() - start
    after = engine.metrics()
    tokens = sum(len(r["tokens"]) for r in replies)
    steps = after["decode_steps"] - before["decode_steps"]
    row_steps = (
        after["mean_live_rows"] * after["decode_steps"]
        - before["mean_live_rows"] * before["decode_steps"]
    )
    return {
        "clients": clients,
        "requests": len(requests),
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "tokens_per_s": tokens / seconds,
        "mean_rows_per_decode_step": row_steps / max(steps, 1),
    }


def _sequential(model, bank, requests: list[dict]) -> dict:
    for length in sorted({len(r["tokens"]) for r in requests}):  # compile every length first
        for name in (ADAPTERS[0], None):
            lora = jaxlora.select(jaxlora.conform(bank), name)
            generate(model, [[1] * length], lora=lora, max_new_tokens=requests[0]["max_new_tokens"])
    start = time.perf_counter()
    tokens = 0
    for r in requests:
        lora = jaxlora.select(jaxlora.conform(bank), r["adapter"])
        out = generate(model, [r["tokens"]], lora=lora, max_new_tokens=r["max_new_tokens"])
        tokens += len(out.rows()[0])
    seconds = time.perf_counter() - start
    return {
        "clients": 1,
        "requests": len(requests),
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def _server(model, bank, rows: int, new: int) -> tuple[ServerThread, Engine]:
    config = EngineConfig(rows=rows, max_len=16 + new, chunks=(16,), slots=len(ADAPTERS), rank=8)
    engine = Engine(model, config)
    service = OpenAIService(engine, model_name="bench", adapter_root=".")
    for name in ADAPTERS:
        service.registry.add(name, bank[name])
    engine.warmup()
    return ServerThread(create_app(service)).start(), engine


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96, help="requests per measurement")
    parser.add_argument("--new-tokens", type=int, default=8, help="max_new_tokens per request")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    model, bank = _setup()
    requests = _requests(args.requests, args.new_tokens)
    results: dict = {"config": dataclasses.asdict(CONFIG), "adapters": len(ADAPTERS)}
    results["sequential_switch"] = _sequential(model, bank, requests)
    server, engine = _server(model, bank, 32, args.new_tokens)
    try:
        _load(server.url, engine, requests[:8], 8)  # warm the HTTP path
        results["batched"] = [_load(server.url, engine, requests, c) for c in (1, 8, 32)]
        results["compile_count"] = sum(engine.compile_counts().values())
    finally:
        server.stop()
    server, engine = _server(model, bank, 1, args.new_tokens)
    try:
        results["server_batch_1"] = _load(server.url, engine, requests, 32)
    finally:
        server.stop()
    base = results["sequential_switch"]["requests_per_s"]
    print(f"{'setting':<28}{'req/s':>10}{'tok/s':>10}{'x seq':>8}")
    rows = [("sequential switch", results["sequential_switch"])]
    rows += [(f"batched, {r['clients']} clients", r) for r in results["batched"]]
    rows.append(("server batch 1, 32 clients", results["server_batch_1"]))
    for label, r in rows:
        ratio = r["requests_per_s"] / base
        print(f"{label:<28}{r['requests_per_s']:>10.1f}{r['tokens_per_s']:>10.1f}{ratio:>8.2f}")
    results["speedup_32_vs_sequential"] = results["batched"][-1]["requests_per_s"] / base
    print(f"compile count (batched server): {results['compile_count']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
