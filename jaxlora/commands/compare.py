"""`jaxlora compare`: how differently two adapters answer the same requests, offline.

Every request is generated greedily under adapter A and adapter B in one mixed batch; the
report gives, per request, both token lists, the first position where they differ, the fraction
of equal positions and `KL(p_A || p_B)` of the next-token distributions after the prompt
(spec SW-SERVE-12). Either side may be `base` (the model without adapter). Request lines use the
`jaxlora generate` format; their `adapter` field, if any, is ignored (both sides run on each).

Example:
    $ jaxlora compare --model llama/ --adapter v1=adapters/v1 --adapter v2=adapters/v2 \\
          --requests requests.jsonl --out divergence.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .generate import RequestError, _write_jsonl, read_requests

__all__ = ["add_arguments", "compare", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Llama checkpoint directory")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="exactly two: NAME=DIR, or `base` for the model alone",
    )
    parser.add_argument(
        "--requests", type=Path, required=True, help="JSONL with `tokens` (`adapter` is ignored)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSONL report (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="default per request")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per batch")


def compare(model, bank, a: str | None, b: str | None, requests, batch_size: int = 8):
    """Per-request divergence rows (see the module docstring); `None` names the base model."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxlora
    from jaxlora.generate import generate
    from jaxlora.models import forward

    stacked = jaxlora.stack(jaxlora.conform(bank))
    rows = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        prompts = [r["tokens"] for r in chunk] * 2
        names = [a] * len(chunk) + [b] * len(chunk)
        out = generate(
            model,
            prompts,
            lora=stacked.route(names),
            max_new_tokens=max(r["max_new_tokens"] for r in chunk),
        ).rows()
        width = max(map(len, prompts))
        tokens = jnp.asarray([[0] * (width - len(p)) + list(p) for p in prompts], jnp.int32)
        mask = jnp.asarray([[0] * (width - len(p)) + [1] * len(p) for p in prompts], bool)
        logits = forward(
            model,
            tokens,
            attention_mask=mask,
            lora=stacked.route(names),
        )[:, -1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        kl = np.asarray(
            jnp.sum(jnp.exp(logp[: len(chunk)]) * (logp[: len(chunk)] - logp[len(chunk) :]), -1)
        )
        for i, req in enumerate(chunk):
            ta, tb = out[i][: req["max_new_tokens"]], out[len(chunk) + i][: req["max_new_tokens"]]
            diffs = [j for j, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y]
            if len(ta) != len(tb):
                diffs.append(min(len(ta), len(tb)))
            positions = max(len(ta), len(tb))
            equal = sum(x == y for x, y in zip(ta, tb, strict=False))
            rows.append(
                {
                    "index": start + i,
                    "tokens_a": ta,
                    "tokens_b": tb,
                    "first_divergence": min(diffs) if diffs else None,
                    "agreement": equal / positions,
                    "kl_next_token": float(kl[i]),
                }
                | ({"id": req["id"]} if "id" in req else {})
            )
    return rows


def run(args: argparse.Namespace) -> int:
    import jaxlora
    from jaxlora.errors import JaxLoraError
    from jaxlora.models import load_llama

    try:
        if len(args.adapter) != 2:
            raise RequestError(f"give exactly two --adapter options, got {len(args.adapter)}.")
        sides: list[tuple[str, str] | None] = []
        for spec in args.adapter:
            name, sep, directory = spec.partition("=")
            if spec != "base" and (not sep or not name or not directory):
                raise RequestError(f"--adapter expects NAME=DIR or base, got {spec!r}.")
            sides.append(None if spec == "base" else (name, directory))
        if args.batch_size < 1:
            raise RequestError(f"--batch-size must be positive, got {args.batch_size}.")
        model = load_llama(args.model)
        # Both sides run on every request, so a line's own `adapter` field is ignored.
        requests = read_requests(
            args.requests, None, args.max_new_tokens, vocab_size=model.config.vocab_size
        )
        bank = jaxlora.AdapterBank()
        for side in sides:
            if side is not None and side[0] not in bank:
                adapter, _ = jaxlora.io.load_peft_adapter(
                    side[1], layer_shapes=model.lora_shapes(), name=side[0]
                )
                bank = bank.add(side[0], adapter)
        a, b = (None if s is None else s[0] for s in sides)
        rows = compare(model, bank, a, b, requests, args.batch_size)
    except (RequestError, JaxLoraError, OSError) as err:
        print(f"jaxlora compare: error: {err}", file=sys.stderr)
        return 2
    if args.out is None:
        for row in rows:
            print(json.dumps(row))
    else:
        _write_jsonl(args.out, rows)
    same = sum(r["first_divergence"] is None for r in rows)
    mean_kl = sum(r["kl_next_token"] for r in rows) / max(len(rows), 1)
    print(
        f"{len(rows)} requests: {same} identical, mean agreement "
        f"{sum(r['agreement'] for r in rows) / max(len(rows), 1):.3f}, mean next-token KL "
        f"{mean_kl:.4g}",
        file=sys.stderr,
    )
    return 0
