"""Server under a mixed workload: continuous batching (the engine) vs the old static batches.

The real HTTP server (`jaxlora serve`'s app, `jaxlora.serve.openai.create_app`, its native
`POST /generate`) on 127.0.0.1 in this process; clients in separate processes
(`benchmarks._clients`, closed loop). Requests: prompts of 3-500 tokens (log-uniform), 4, 48
or 128 new tokens (in turn), 7 rank-8 adapters + the base model (uniform), greedy, no stop.
Per server:

- `alone`: one client sending only 4-token requests: their latency alone;
- `1 client` and `16 clients` on the mixed workload: requests/s, tokens/s, and the p50 / p90
  latency of the 4-token requests among them.

Targets (engine): throughput at 16 clients >= 3x one client; p50 of 4-token requests at 16
clients <= 5x their latency alone. The old static scheduler (`benchmarks._static_serving`,
the same model code, behind a minimal HTTP layer of its own) is measured in the same run with
the same requests.

Run: `python -m benchmarks.serving_engine --json benchmarks/results/serving_engine.json`;
a smoke run: `--clients 2 --per-client 2 --one 2 --alone 2 --rows 2 --longest 16 --kinds 2,4`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

import jaxlora
from jaxlora.engine import Engine, EngineConfig
from jaxlora.models import Llama, LlamaConfig
from jaxlora.serve import OpenAIService, ServerThread, create_app

from . import _static_serving as static
from ._clients import latencies, run_clients
from ._harness import machine_info, ratio

__all__ = ["main", "workload"]

CONFIG = LlamaConfig(256, 64, 128, 2, 4, 2, 16)
ADAPTERS = [f"task{i}" for i in range(7)]
KINDS = (4, 48, 128)
LONGEST = 500


def workload(
    n: int, seed: int, kinds: Sequence[int] = KINDS, longest: int = LONGEST
) -> list[tuple[str, dict]]:
    """`n` `(kind, body)`: log-uniform prompt 3-`longest` tokens, kind = max_new_tokens
    (cycling through `kinds`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = round(math.exp(rng.uniform(math.log(3), math.log(longest))))
        new = kinds[i % len(kinds)]
        adapter = rng.choice([*ADAPTERS, None])
        tokens = [rng.randrange(1, CONFIG.vocab_size) for _ in range(length)]
        out.append((str(new), {"tokens": tokens, "adapter": adapter, "max_new_tokens": new}))
    return out


def _adapters(model: Llama) -> dict[str, Any]:
    cfg = jaxlora.LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False
    )
    return {
        n: jaxlora.init_adapter(jax.random.key(10 + i), cfg, model.lora_shapes())
        for i, n in enumerate(ADAPTERS)
    }


def _engine_server(model, adapters, args) -> tuple[ServerThread, Any]:
    """The one real server: `jaxlora serve`'s app on the engine."""
    config = EngineConfig(
        rows=args.rows,
        max_len=args.longest + max(args.kinds),
        chunks=tuple(c for c in (16, 64, 256) if c <= args.longest) or (args.longest,),
        prefill_tokens=256,
        slots=8,
        rank=8,
        max_waiting=4096,
        decode_steps=args.decode_steps,
    )
    engine = Engine(model, config)
    service = OpenAIService(engine, model_name="bench", adapter_root=".", timeout_s=3600)
    for name, adapter in adapters.items():
        service.registry.add(name, adapter)
    engine.warmup()
    return ServerThread(create_app(service)).start(), _Compiles(engine)


class _Compiles:
    """`compile_count()` of the engine: its compiled executables (SW-ENGINE-3)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def compile_count(self) -> int:
        return sum(self.engine.compile_counts().values())


def _static_server(model, adapters, args) -> tuple[ServerThread, Any]:
    buckets = static.Buckets(
        tuple(sorted({1, args.rows})),
        tuple(sorted({min(64, args.longest), args.longest})),
        max(args.kinds),
    )
    engine = static.Engine(model, capacity=8, rank=8, buckets=buckets)
    for name, adapter in adapters.items():
        engine.load(name, adapter)
    engine.warmup()
    app = static.create_app(engine, window_s=0.005, max_pending=4096)
    return ServerThread(app).start(), engine


def _measure(url: str, args) -> dict[str, Any]:
    short = str(min(args.kinds))
    alone = workload(args.alone, seed=1, kinds=(min(args.kinds),), longest=args.longest)
    one = workload(args.one, seed=2, kinds=args.kinds, longest=args.longest)
    many = workload(args.clients * args.per_client, seed=3, kinds=args.kinds, longest=args.longest)
    out: dict[str, Any] = {}
    _, records = run_clients(url, [alone])
    out["alone_4_p50_s"] = statistics.median(latencies(records, short))
    for label, bodies, clients in (("1", one, 1), (str(args.clients), many, args.clients)):
        shares = [bodies[i::clients] for i in range(clients)]
        wall, records = run_clients(url, shares)
        ok = [r for r in records if r[3] == 200]
        four = sorted(latencies(records, short))
        out[label] = {
            "clients": clients,
            "requests": len(records),
            "failed": len(records) - len(ok),
            "seconds": wall,
            "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r[4] for r in ok) / wall,
            "p50_4_s": statistics.median(four),
            "p90_4_s": four[int(0.9 * (len(four) - 1))],
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=8, help="mixed requests per client")
    parser.add_argument("--one", type=int, default=32, help="mixed requests of the 1-client run")
    parser.add_argument("--alone", type=int, default=16, help="4-token requests alone")
    parser.add_argument("--rows", type=int, default=16, help="engine rows / largest static batch")
    parser.add_argument("--longest", type=int, default=LONGEST, help="the longest prompt")
    parser.add_argument(
        "--kinds",
        type=lambda t: tuple(int(v) for v in t.split(",")),
        default=KINDS,
        help="max_new_tokens of the requests, in turn (the smallest: the latency kind)",
    )
    parser.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="the engine's decode steps per device call (`jaxlora serve --decode-steps`)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    model = Llama.random(CONFIG, seed=0)
    adapters = _adapters(model)
    report: dict[str, Any] = {"config": dataclasses.asdict(CONFIG), "args": vars(args)}
    for name, build in (("engine", _engine_server), ("static", _static_server)):
        server, engine = build(model, adapters, args)
        try:
            compiled = engine.compile_count()
            result = _measure(server.url, args)
            result["compiles_during_load"] = engine.compile_count() - compiled
        finally:
            server.stop()
        many = result[str(args.clients)]
        result["throughput_many_vs_one"] = ratio(
            many["requests_per_s"], result["1"]["requests_per_s"]
        )
        result["p50_4_many_vs_alone"] = ratio(many["p50_4_s"], result["alone_4_p50_s"])
        report[name] = result
        print(f"{name}: alone 4-token p50 {result['alone_4_p50_s'] * 1e3:.1f} ms")
        for label in ("1", str(args.clients)):
            r = result[label]
            print(
                f"  {label:>2} clients: {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.0f} "
                f"tok/s, 4-token p50 {r['p50_4_s'] * 1e3:.1f} ms, p90 {r['p90_4_s'] * 1e3:.1f} "
                f"ms, failed {r['failed']}"
            )
        print(
            f"  throughput {args.clients} vs 1: {result['throughput_many_vs_one']:.2f}x; 4-token "
            f"p50 {args.clients} clients vs alone: {result['p50_4_many_vs_alone']:.2f}x; "
            f"compiles under load: {result['compiles_during_load']}"
        )
    report["targets"] = {"throughput_many_vs_one": ">= 3", "p50_4_many_vs_alone": "<= 5"}
    report["machine"] = machine_info()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
