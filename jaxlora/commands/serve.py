"""`jaxlora serve`: one base model, many adapters, OpenAI-compatible HTTP (specs/serving.md).

One server (`jaxlora.serve.openai.create_app`): the `/v1/*` routes, the native token-level
`POST /generate`, `/health` and Prometheus `/metrics`. The engine's sizes
(`jaxlora.engine.EngineConfig`) are flags: `--rows`, `--max-len`, `--chunks`,
`--prefill-tokens`, `--slots`, `--rank`, `--targets`, `--cache-dtype`, `--routing`,
`--decode-steps`, `--max-stop-tokens` and `--max-pending` (its `max_waiting`).

Safe by default (SW-SEC-*): it listens on 127.0.0.1, accepts only local Host names, refuses
cross-origin state changes, loads adapters at run time only with --enable-runtime-lora, only
from under --adapter-root, and only for an admin (--api-key, or an explicit
--allow-unauthenticated-admin). Every flag is checked when parsed (exit status 2 naming it);
`--help` shows the defaults (SW-OPS-1).

Example:
    $ jaxlora serve --model llama/ --adapter chat=adapters/chat --adapter sql=adapters/sql \\
          --split summarize=summ_v1:0.9,summ_v2:0.1 --api-key "$KEY" --port 8000
    $ curl -s localhost:8000/v1/completions -H "Authorization: Bearer $KEY" \\
          -H 'Content-Type: application/json' -d '{"model": "sql", "prompt": "SELECT"}'
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "build_service", "run"]


def _checked(kind, test, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_port = _checked(int, lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535] (0: any free port)")
_positive = _checked(int, lambda v: v >= 1, "an int >= 1")
_seconds = _checked(float, lambda v: 0 < v < math.inf, "a finite number of seconds > 0")
_bound = _checked(float, lambda v: v > 0, "a number > 0 (inf: no bound)")
_confidence = _checked(float, lambda v: not math.isnan(v), "a number (-inf: accept all)")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated ints >= 1 in ascending order, got {text!r}"
        )
    return values


#: The KV cache dtypes `--cache-dtype` takes (None: the model's dtype).
CACHE_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jaxlora.routing import ROUTINGS

    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    add = parser.add_argument
    add(
        "--model",
        type=Path,
        required=True,
        help="checkpoint directory (config, weights, tokenizer.json, chat template)",
    )
    add(
        "--served-model-name",
        default=None,
        help="the base model's `model` name (None: the directory's name)",
    )
    add(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="PEFT adapter loaded at start (any path: the operator's choice)",
    )
    add(
        "--adapter-root",
        type=Path,
        default=Path("adapters"),
        help="runtime loads read only directories under it",
    )
    add(
        "--enable-runtime-lora",
        action="store_true",
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter (admin only)",
    )
    add(
        "--api-key",
        default=None,
        help="Bearer key every request must send (None: env JAXLORA_API_KEY, if set)",
    )
    add(
        "--allow-unauthenticated-admin",
        action="store_true",
        help="allow admin endpoints without an API key (trusted machines only)",
    )
    add(
        "--allowed-host",
        action="append",
        default=None,
        metavar="NAME",
        help="accepted Host header name (repeat; '*': any; None: localhost, 127.0.0.1, ::1)",
    )
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=_port, default=8000, help="TCP port")
    add("--rows", type=_positive, default=16, help="sequences decoded together")
    add("--max-len", type=_positive, default=512, help="prompt + generated tokens per request")
    add("--chunks", type=_ints, default=(16, 64), help="prefill chunk sizes, ascending")
    add(
        "--prefill-tokens",
        type=_positive,
        default=256,
        help="tokens per prefill call (a call takes prefill_tokens // chunk prompts)",
    )
    add(
        "--cache-dtype",
        default=None,
        choices=CACHE_DTYPES,
        help="KV cache dtype (None: the model's)",
    )
    add("--routing", default="auto", choices=ROUTINGS, help="mixed-batch LoRA kernel")
    add(
        "--decode-steps",
        type=_positive,
        default=1,
        help="most decode steps per device call (like vLLM's --num-scheduler-steps): more "
        "saves per-call work, a new request waits up to that many steps, streams come in bursts",
    )
    add("--slots", type=_positive, default=8, help="device adapter slots (LRU cache)")
    add("--rank", type=_positive, default=None, help="slot rank (None: the largest loaded, or 8)")
    add(
        "--targets",
        default=None,
        help="comma-separated layer paths of the slots (None: every projection)",
    )
    add("--max-adapters", type=_positive, default=None, help="adapters held on the host")
    add("--max-pending", type=_positive, default=1024, help="requests waiting for a row (then 503)")
    add("--max-stop-tokens", type=_positive, default=16, help="stop token ids per request")
    add("--default-max-tokens", type=_positive, default=256, help="max_tokens if none given")
    add("--max-n", type=_positive, default=16, help="choices per request")
    add("--max-body-bytes", type=_positive, default=1 << 20, help="request body limit")
    add("--timeout", type=_seconds, default=600.0, help="seconds per request (then 504)")
    add(
        "--max-adapter-delta",
        type=_bound,
        default=1e4,
        help="refuse adapters whose scale*A@B can exceed this per entry",
    )
    add("--split", action="append", default=[], help="A/B split, e.g. task=a:0.9,b:0.1")
    add("--fallback", action="append", default=[], help="fallback chain, e.g. task=a,b,base")
    add("--min-confidence", type=_confidence, default=-math.inf, help="fallback acceptance bar")
    add(
        "--classifier",
        default=None,
        help="module:function, body -> adapter name, for POST /generate requests naming none",
    )
    add("--no-warmup", action="store_true", help="compile on first use")
    add(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn log level",
    )


def _classifier(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_service(args: argparse.Namespace) -> Any:
    """The `OpenAIService` the arguments describe (adapters loaded, engine not started)."""
    import jaxlora
    import jaxlora.models
    from jaxlora.engine import Engine, EngineConfig
    from jaxlora.errors import ConfigError, format_names
    from jaxlora.serve.hooks import RoutingHooks, parse_fallback, parse_split
    from jaxlora.serve.openai import OpenAIService
    from jaxlora.serve.security import LOCAL_HOSTS, Policy
    from jaxlora.serve.text import Text

    if not 0 < args.timeout < math.inf:
        raise ConfigError(
            f"--timeout must be a finite number of seconds > 0, got {args.timeout}; e.g. 60."
        )
    model = jaxlora.models.load_llama(args.model)
    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter expects NAME=DIR, got {spec!r}.")
        adapters[name] = (
            jaxlora.io.load_peft_adapter(directory, layer_shapes=model.lora_shapes(), name=name)[0],
            directory,
        )
    ranks = [w.a.shape[-1] for ad, _ in adapters.values() for w in ad.values()]
    config = EngineConfig(
        rows=args.rows,
        max_len=args.max_len,
        chunks=args.chunks,
        prefill_tokens=args.prefill_tokens,
        cache_dtype=args.cache_dtype,
        routing=args.routing,
        slots=args.slots,
        rank=args.rank or max(ranks, default=8),
        max_waiting=args.max_pending,
        targets=None if args.targets is None else tuple(args.targets.split(",")),
        stop_width=args.max_stop_tokens,
        decode_steps=args.decode_steps,
    )
    engine = Engine(model, config, max_adapters=args.max_adapters)
    hooks = RoutingHooks(
        classifier=_classifier(args.classifier),
        splits=[parse_split(s) for s in args.split],
        fallbacks=[parse_fallback(s) for s in args.fallback],
        min_confidence=args.min_confidence,
    )
    unknown = sorted(hooks.names() - set(adapters))
    if unknown:
        raise ConfigError(
            f"--split/--fallback name adapter(s) {format_names(unknown)} that are not loaded. "
            f"Loaded: {format_names(sorted(adapters))} (and 'base'); load them with "
            "--adapter NAME=DIR or fix the names."
        )
    text = Text.from_directory(args.model) if (args.model / "tokenizer.json").is_file() else None
    api_key = args.api_key if args.api_key is not None else os.environ.get("JAXLORA_API_KEY")
    policy = Policy(
        api_key, args.allow_unauthenticated_admin, tuple(args.allowed_host or LOCAL_HOSTS)
    )
    service = OpenAIService(
        engine,
        model_name=args.served_model_name or Path(args.model).resolve().name,
        adapter_root=args.adapter_root,
        text=text,
        hooks=hooks,
        policy=policy,
        runtime_loading=args.enable_runtime_lora,
        max_adapter_delta=args.max_adapter_delta,
        default_max_tokens=args.default_max_tokens,
        max_n=args.max_n,
        max_body_bytes=args.max_body_bytes,
        timeout_s=args.timeout,
        model_source=str(Path(args.model).resolve()),
    )
    for name, (adapter, directory) in adapters.items():
        service.registry.add(name, adapter, str(Path(directory).resolve()))
    return service


def run(args: argparse.Namespace) -> int:
    from jaxlora.errors import JaxLoraError

    try:
        service = build_service(args)
        if not args.no_warmup:
            service.engine.warmup()
    except (JaxLoraError, OSError) as err:
        print(f"jaxlora serve: error: {err}", file=sys.stderr)
        return 2
    from jaxlora.serve.openai import create_app
    from jaxlora.serve.runner import serve_forever

    if service.policy.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"jaxlora serve: warning: listening on {args.host} without --api-key.", file=sys.stderr
        )
    serve_forever(create_app(service), args.host, args.port, log_level=args.log_level)
    return 0
