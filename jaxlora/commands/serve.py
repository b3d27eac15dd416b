"""`jaxlora serve`: one base model, many adapters, per-request routing over HTTP (SW-SERVE-*).

Example:
    $ jaxlora serve --model llama/ --adapter chat=adapters/chat --adapter sql=adapters/sql \\
          --split summarize=summ_v1:0.9,summ_v2:0.1 --port 8000
    $ curl -s localhost:8000/generate -d '{"tokens": [1, 5, 9], "adapter": "sql"}'
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

__all__ = ["add_arguments", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Llama checkpoint directory")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME=DIR", help="PEFT adapter to load"
    )
    parser.add_argument("--capacity", type=int, default=16, help="adapter slots")
    parser.add_argument("--rank", type=int, default=None, help="bank rank (default: max loaded)")
    parser.add_argument("--targets", default=None, help="comma-separated layer paths of the bank")
    parser.add_argument("--batch-sizes", type=_ints, default=(1, 8, 32), help="e.g. 1,8,32")
    parser.add_argument("--prompt-lengths", type=_ints, default=(32, 128, 512), help="buckets")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="per-request limit")
    parser.add_argument("--window-ms", type=float, default=5.0, help="batching window")
    parser.add_argument("--max-pending", type=int, default=256, help="queue bound (then 503)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request seconds")
    parser.add_argument("--split", action="append", default=[], help="task=a:0.9,b:0.1")
    parser.add_argument("--fallback", action="append", default=[], help="task=a,b,base")
    parser.add_argument("--min-confidence", type=float, default=-math.inf, help="fallback bar")
    parser.add_argument("--classifier", default=None, help="module:function, body -> name")
    parser.add_argument("--adapter-root", type=Path, default=None, help="POST loads only here")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-warmup", action="store_true", help="compile on first use")


def _classifier(spec: str | None):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def build_service(args: argparse.Namespace):
    """The `Service` the arguments describe (adapters loaded, not yet warmed up)."""
    import jaxlora
    from jaxlora.errors import ConfigError, format_names
    from jaxlora.models import load_llama
    from jaxlora.serve import Buckets, Engine, RoutingHooks, Service, parse_fallback, parse_split

    if not 0 < args.timeout < math.inf:
        raise ConfigError(
            f"--timeout must be a finite number of seconds > 0, got {args.timeout}; e.g. 60."
        )
    model = load_llama(args.model)
    adapters = {}
    for spec in args.adapter:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter expects NAME=DIR, got {spec!r}.")
        adapters[name] = jaxlora.io.load_peft_adapter(
            directory, layer_shapes=model.lora_shapes(), name=name
        )[0]
    ranks = [w.a.shape[-1] for ad in adapters.values() for w in ad.values()]
    engine = Engine(
        model,
        capacity=args.capacity,
        rank=args.rank or max(ranks, default=8),
        targets=None if args.targets is None else args.targets.split(","),
        buckets=Buckets(args.batch_sizes, args.prompt_lengths, args.max_new_tokens),
    )
    for name, adapter in adapters.items():
        engine.load(name, adapter, source=dict(s.split("=", 1) for s in args.adapter)[name])
    hooks = RoutingHooks(
        classifier=_classifier(args.classifier),
        splits=[parse_split(s) for s in args.split],
        fallbacks=[parse_fallback(s) for s in args.fallback],
        min_confidence=args.min_confidence,
    )
    unknown = sorted(hooks.names() - set(engine.adapters()))
    if unknown:
        raise ConfigError(
            f"--split/--fallback name adapter(s) {format_names(unknown)} that are not loaded. "
            f"Loaded: {format_names(sorted(engine.adapters()))} (and 'base'); load them with "
            "--adapter NAME=DIR or fix the names."
        )
    tokenizer = None
    if (args.model / "tokenizer.json").is_file():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    return Service(
        engine,
        hooks=hooks,
        window_s=args.window_ms / 1e3,
        max_pending=args.max_pending,
        timeout_s=args.timeout,
        tokenizer=tokenizer,
        adapter_root=args.adapter_root,
    )


def run(args: argparse.Namespace) -> int:
    from jaxlora.errors import JaxLoraError

    try:
        service = build_service(args)
        if not args.no_warmup:
            service.engine.warmup()
    except (JaxLoraError, OSError) as err:
        print(f"jaxlora serve: error: {err}", file=sys.stderr)
        return 2
    from jaxlora.serve.app import create_app
    from jaxlora.serve.runner import serve_forever

    serve_forever(create_app(service), args.host, args.port)
    return 0
