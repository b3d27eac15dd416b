"""`jaxlora generate`: JSONL requests in, JSONL results out, each request on its own adapter.

Each input line is a JSON object: `tokens` (token ids) or `text` (when the checkpoint directory
has a tokenizer), `adapter` (a name given with `--adapter`, or null/absent for the base model),
`max_new_tokens` (default `--max-new-tokens`) and an optional `id` copied to the result.
Requests are batched in input order (`--batch-size` rows per mixed batch); every result line
holds `index`, `adapter`, `prompt_tokens`, `tokens` (and `text`, `id` when present) (SW-CLI-2).

Example:
    $ jaxlora generate --model llama/ --adapter chat=adapters/chat --adapter sql=adapters/sql \\
          --requests requests.jsonl --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["RequestError", "add_arguments", "read_requests", "run"]


class RequestError(ConfigError):
    """A request line or option is malformed (exit status 2); a `ConfigError` (`ValueError`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Llama checkpoint directory")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT adapter directory under a name (repeatable)",
    )
    parser.add_argument("--requests", type=Path, required=True, help="input JSONL file")
    parser.add_argument("--out", type=Path, required=True, help="output JSONL file")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per mixed batch")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default per request")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the top k")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed when sampling")
    parser.add_argument(
        "--stop",
        type=int,
        action="append",
        default=None,
        help="stop token id (repeatable; default: the checkpoint's eos_token_id)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_requests(
    path: Path,
    adapters: set[str] | None,
    default_max: int,
    tokenizer=None,
    vocab_size: int | None = None,
) -> list[dict]:
    """Parse and validate every line; raises `RequestError` naming the line.

    `adapters=None` ignores each line's `adapter` field (every request gets `adapter: None`);
    with `vocab_size`, token ids outside `[0, vocab_size)` are refused here, per line.
    """
    requests = []
    for number, data in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path} line {number}"
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError(
                f"{where}: not UTF-8 text ({err}); write the requests file as UTF-8 JSONL."
            ) from None
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise RequestError(f"{where}: not valid JSON ({err}).") from None
        if not isinstance(raw, dict):
            raise RequestError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
        name = raw.get("adapter")
        if adapters is None:
            name = None
        elif name is not None and not isinstance(name, str):
            raise RequestError(
                f"{where}: `adapter` must be a name (a string) or null, got {name!r}."
            )
        elif name is not None and name not in adapters:
            known = ", ".join(sorted(adapters)) or "(none)"
            raise RequestError(
                f"{where}: unknown adapter {name!r}; load it with --adapter {name}=DIR "
                f"(loaded: {known}), or use null for the base model."
            )
        if "tokens" in raw:
            tokens = raw["tokens"]
            if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens
            ):
                raise RequestError(f"{where}: `tokens` must be a list of ints.")
        elif "text" in raw:
            if tokenizer is None:
                raise RequestError(
                    f"{where}: `text` needs a tokenizer in the checkpoint directory; "
                    "send `tokens` (token ids) instead."
                )
            if not isinstance(raw["text"], str):
                raise RequestError(
                    f"{where}: `text` must be a string, got {type(raw['text']).__name__}."
                )
            tokens = list(tokenizer(raw["text"])["input_ids"])
        else:
            raise RequestError(f"{where}: needs `tokens` (a list of ids) or `text`.")
        if not tokens:
            raise RequestError(f"{where}: the prompt is empty; give at least one token.")
        if vocab_size is not None:
            bad = [t for t in tokens if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(
                    f"{where}: token id {bad[0]} outside the model's vocabulary [0, {vocab_size})."
                )
        limit = raw.get("max_new_tokens", default_max)
        if not isinstance(limit, int) or limit < 1:
            raise RequestError(f"{where}: `max_new_tokens` must be a positive int, got {limit!r}.")
        requests.append(
            {"tokens": tokens, "adapter": name, "max_new_tokens": limit}
            | ({"id": raw["id"]} if "id" in raw else {})
        )
    return requests


def _progress(done: int, total: int, quiet: bool) -> None:
    if quiet or total <= 1:
        return
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests{end}")
    sys.stderr.flush()


def _tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _stop_tokens(model_dir: Path, explicit: list[int] | None) -> list[int]:
    if explicit is not None:
        return explicit
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomic: a temporary file in the same directory, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args: argparse.Namespace) -> int:
    import jax

    import jaxlora
    from jaxlora.errors import JaxLoraError
    from jaxlora.generate import generate
    from jaxlora.models import load_llama

    try:
        named = {}
        for spec in args.adapter:
            name, sep, directory = spec.partition("=")
            if not sep or not name or not directory:
                raise RequestError(f"--adapter expects NAME=DIR, got {spec!r}.")
            named[name] = Path(directory)
        if args.batch_size < 1:
            raise RequestError(f"--batch-size must be positive, got {args.batch_size}.")
        if not math.isfinite(args.temperature) or args.temperature < 0:
            raise RequestError(
                f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}."
            )
        model = load_llama(args.model)
        tokenizer = _tokenizer(args.model)
        requests = read_requests(
            args.requests, set(named), args.max_new_tokens, tokenizer, model.config.vocab_size
        )
        bank = jaxlora.AdapterBank()
        for name, directory in named.items():
            adapter, _ = jaxlora.io.load_peft_adapter(
                directory, layer_shapes=model.lora_shapes(), name=name
            )
            bank = bank.add(name, adapter)
        stacked = jaxlora.stack(jaxlora.conform(bank))
        stop = _stop_tokens(args.model, args.stop)
        results = []
        _progress(0, len(requests), args.quiet)
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start : start + args.batch_size]
            out = generate(
                model,
                stacked,
                [r["tokens"] for r in batch],
                [r["adapter"] for r in batch],
                max_new_tokens=max(r["max_new_tokens"] for r in batch),
                temperature=args.temperature,
                top_k=args.top_k,
                key=jax.random.fold_in(jax.random.key(args.seed), start),
                stop_tokens=stop,
                pad_id=0,
            )
            for offset, (req, row) in enumerate(zip(batch, out.rows(), strict=True)):
                row = row[: req["max_new_tokens"]]
                result = {
                    "index": start + offset,
                    "adapter": req["adapter"],
                    "prompt_tokens": len(req["tokens"]),
                    "tokens": row,
                }
                if tokenizer is not None:
                    result["text"] = tokenizer.decode(row)
                if "id" in req:
                    result["id"] = req["id"]
                results.append(result)
            _progress(len(results), len(requests), args.quiet)
    except (RequestError, JaxLoraError, OSError) as err:
        print(f"jaxlora generate: error: {err}", file=sys.stderr)
        return 2
    _write_jsonl(args.out, results)
    print(f"wrote {len(results)} results to {args.out}")
    return 0
