"""`jaxlora generate`: JSONL requests in, JSONL results out, each request on its own adapter.

The request and result formats are `FORMAT_HELP` (shown by `jaxlora generate --help`).
Requests are batched in input order (`--batch-size` rows per mixed batch) (spec SW-CLI-2).

Example:
    $ jaxlora generate --model llama/ --adapter chat=adapters/chat --adapter sql=adapters/sql \\
          --requests requests.jsonl --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._key_map import add_key_map_argument, key_map_of

__all__ = ["FORMAT_HELP", "RequestError", "add_arguments", "read_requests", "run"]

#: The JSONL formats, as `--help` shows them.
FORMAT_HELP = """\
requests (--requests): one JSON object per line (blank lines are skipped):
  tokens          list of token ids, e.g. [1, 17, 42]; or
  text            a string, when the --model directory has a tokenizer
  adapter         a NAME given with --adapter, or null / absent for the base model
  max_new_tokens  positive int (default --max-new-tokens)
  id              any JSON value, copied to the result
  e.g. {"tokens": [1, 17, 42], "adapter": "chat", "max_new_tokens": 8, "id": "q1"}

results (--out): one JSON object per request, in input order:
  index           the request's position among the requests (0-based)
  adapter         the adapter name or null
  prompt_tokens   the prompt's length in tokens
  tokens          the generated token ids (at most max_new_tokens; a stop token is kept)
  text            the decoded tokens (with a tokenizer)
  id              the request's id (when given)
  e.g. {"index": 0, "adapter": "chat", "prompt_tokens": 3, "tokens": [5, 9, 2], "id": "q1"}

A malformed line or an unknown adapter exits 2 naming the line; nothing is written then."""


class RequestError(ConfigError):
    """A request line or option is malformed (exit status 2); a `ConfigError` (`ValueError`)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = FORMAT_HELP
    parser.add_argument("--model", type=Path, required=True, help="Llama checkpoint directory")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a PEFT adapter directory under a name (repeatable)",
    )
    add_key_map_argument(parser)
    parser.add_argument(
        "--requests", type=Path, required=True, help="input JSONL file (format below)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output JSONL file (format below; atomic)"
    )
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


def _shows_progress(total: int, quiet: bool) -> bool:
    return not quiet and total > 1


def _progress(done: int, total: int, quiet: bool) -> None:
    """Redraw the progress line on stderr (no newline: `_end_progress` ends it)."""
    if not _shows_progress(total, quiet):
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests")
    sys.stderr.flush()


def _end_progress(total: int, quiet: bool) -> None:
    """End the progress line with a newline, whether the run completed or failed."""
    if _shows_progress(total, quiet):
        sys.stderr.write("\n")
        sys.stderr.flush()


def _tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _stop_tokens(model_dir: Path, explicit: list[int] | None) -> list[int]:
    if explicit is not None:
        return explicit
    from jaxlora.io import MODEL_CONFIG_NAME

    eos = json.loads((model_dir / MODEL_CONFIG_NAME).read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, written atomically (`jaxlora.io.atomic_write`)."""
    from jaxlora.io import atomic_write

    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _generate_all(model, stacked, requests, args, stop, tokenizer) -> list[dict[str, Any]]:
    """Every request's result, in order, `--batch-size` requests per mixed batch."""
    import jax

    from jaxlora.generate import generate

    results = []
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start : start + args.batch_size]
        out = generate(
            model,
            [r["tokens"] for r in batch],
            lora=stacked.route([r["adapter"] for r in batch]),
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
    return results


def run(args: argparse.Namespace) -> int:
    import jaxlora
    from jaxlora.errors import JaxLoraError
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
                directory, key_map=key_map_of(args), layer_shapes=model.lora_shapes(), name=name
            )
            bank = bank.add(name, adapter)
        stacked = jaxlora.stack(jaxlora.conform(bank))
        stop = _stop_tokens(args.model, args.stop)
        _progress(0, len(requests), args.quiet)
        try:
            results = _generate_all(model, stacked, requests, args, stop, tokenizer)
        finally:
            _end_progress(len(requests), args.quiet)
        _write_jsonl(args.out, results)
    except (RequestError, JaxLoraError, OSError) as err:
        print(f"jaxlora generate: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(results)} results to {args.out}")
    return 0
