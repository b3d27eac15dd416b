"""Load test of the OpenAI-compatible server with clients in separate processes.

Starts `jaxlora serve`'s app (`jaxlora.serve.openai`) on 127.0.0.1 in this process, then, for
each count in `--clients`, that many client processes (the real `openai` client, closed loop:
each sends its requests one after the other). Requests mix 7 adapters and the base model, prompt
lengths 3-48 tokens, 4/16/32 new tokens, streamed and not. Every answer's tokens are compared
with its single-request reference (the same request alone on a separate engine, offline); the
report gives throughput (requests/s, generated tokens/s), latency p50 / p99 per client count,
and the number of mismatches (expected: 0). Nothing is asserted on timings.

Example:
    $ python -m benchmarks.openai_load --requests 128 --clients 1,8,16 --json openai_load.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import statistics
import time
from typing import Any

import jax

import jaxlora
from jaxlora.engine import Engine, EngineConfig, Request
from jaxlora.models import Llama, LlamaConfig

CONFIG = LlamaConfig(256, 64, 128, 2, 4, 2, 16)
ADAPTERS = [f"task{i}" for i in range(7)]
MODEL = "bench-llama"


def _adapters(model: Llama) -> dict[str, Any]:
    out = {}
    for i, name in enumerate(ADAPTERS):
        cfg = jaxlora.LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
        )
        out[name] = jaxlora.init_adapter(jax.random.key(10 + i), cfg, model.lora_shapes())
    return out


def _engine(model: Llama) -> Engine:
    return Engine(model, EngineConfig(rows=16, max_len=96, chunks=(16, 64), slots=8, rank=8))


def workload(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` request bodies: adapters + base, prompt lengths 3-48, 4/16/32 tokens, half streamed."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        length = rng.choice([3, 8, 24, 48])
        bodies.append(
            {
                "model": rng.choice([*ADAPTERS, MODEL]),
                "prompt": [rng.randrange(1, CONFIG.vocab_size) for _ in range(length)],
                "max_tokens": rng.choice([4, 16, 32]),
                "temperature": 0,
                "stream": i % 2 == 1,
            }
        )
    return bodies


def _client(url: str, share: int, bodies: list[dict[str, Any]], out, ready, go) -> None:
    """One client process: once `go` is set, send `bodies` in order; put `(share, start, end,
    [(latency_s, tokens)])` (monotonic clock, shared by the processes on Linux)."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    c.models.list()  # connect and import everything before the clock starts
    ready.put(share)
    go.wait()
    first = time.monotonic()
    results = []
    for body in bodies:
        args = dict(body, extra_body={"return_token_ids": True, "ignore_eos": True})
        start = time.perf_counter()
        if body["stream"]:
            tokens = []
            for chunk in c.completions.create(**args):
                if chunk.choices:
                    tokens += chunk.choices[0].token_ids or []
        else:
            tokens = c.completions.create(**args).choices[0].token_ids
        results.append((time.perf_counter() - start, tokens))
    out.put((share, first, time.monotonic(), results))


def _run(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[float, list]:
    ctx = multiprocessing.get_context("spawn")
    queue, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [bodies[i::clients] for i in range(clients)]
    procs = [
        ctx.Process(target=_client, args=(url, i, s, queue, ready, go))
        for i, s in enumerate(shares)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get()
    go.set()
    gathered = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(g[2] for g in gathered) - min(g[1] for g in gathered)
    ordered: list = [None] * len(bodies)
    for s, _, _, results in gathered:
        for j, r in enumerate(results):
            ordered[s + j * clients] = r
    return elapsed, ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.openai_load")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", default="1,8", help="client process counts, e.g. 1,8,16")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)

    from jaxlora.serve.openai import OpenAIService, create_app
    from jaxlora.serve.runner import ServerThread

    model = Llama.random(CONFIG, seed=0)
    adapters = _adapters(model)
    engine = _engine(model)
    engine.warmup()
    service = OpenAIService(engine, model_name=MODEL, adapter_root=".")
    for name, adapter in adapters.items():
        service.registry.add(name, adapter)
    reference = _engine(model)
    for name, adapter in adapters.items():
        reference.add_adapter(name, adapter)

    bodies = workload(args.requests, seed=1)
    refs = [
        reference.generate(
            [
                Request(
                    tuple(b["prompt"]),
                    b["max_tokens"],
                    adapter=None if b["model"] == MODEL else b["model"],
                )
            ]
        )[0].tokens
        for b in bodies
    ]
    report: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "cpus": multiprocessing.cpu_count(),
        },
        "requests": args.requests,
        "model": str(CONFIG),
        "runs": [],
    }
    server = ServerThread(create_app(service)).start()
    try:
        for clients in sorted({int(c) for c in args.clients.split(",")}):
            elapsed, results = _run(server.url, bodies, clients)
            latencies = sorted(r[0] for r in results)
            mismatches = sum(r[1] != ref for r, ref in zip(results, refs, strict=True))
            tokens = sum(len(r[1]) for r in results)
            run = {
                "clients": clients,
                "seconds": elapsed,
                "requests_per_s": len(results) / elapsed,
                "tokens_per_s": tokens / elapsed,
                "p50_ms": 1e3 * statistics.median(latencies),
                "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
                "mismatches": mismatches,
            }
            report["runs"].append(run)
            print(json.dumps(run))
    finally:
        server.stop()
    report["compiles"] = engine.compile_counts()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r["mismatches"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
