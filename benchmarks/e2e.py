"""End to end: mixed-adapter generation with the engine vs PEFT `generate(adapter_names=)`.

The same random Llama (a `transformers` checkpoint that jaxlora loads) and the same PEFT
adapters (saved by PEFT, loaded by `jaxlora.io.load_peft`); `batch` prompts of `prompt` random
tokens, row `i` on adapter `i % adapters`, `new` greedy tokens per row, no stop token. jaxlora
is `jaxlora.generate(model, prompts, lora=stacked.route(names), config=...)` (the engine: one
prefill call, then decode calls of up to `--decode-steps` steps each); PEFT is
`peft_model.generate(input_ids, adapter_names=names, do_sample=False)`. Both are timed
interleaved after one warm-up each (so jaxlora's compilation is not timed); the tokens are
checked equal first. Target: jaxlora >= 3x PEFT's tokens/s. The same engine on the base model
(`lora=None`, `slots=0`) is timed in the same interleaving: PEFT's time over it is the ratio
jaxlora would reach if the adapters cost nothing (`ceiling_base_vs_peft_tokens_per_s`).

Run: `python -m benchmarks.e2e --json benchmarks/results/e2e.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import jaxlora
from jaxlora.engine import EngineConfig
from jaxlora.generate import generate

from ._harness import BenchConfig, machine_info, ratio, time_interleaved
from ._setup import Setup

__all__ = ["main", "run"]


def run(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    vocab: int,
    batch: int,
    prompt: int,
    new: int,
    adapters: int,
    rank: int,
    repeats: int,
    decode_steps: int = 32,
) -> dict[str, Any]:
    """Build both sides, check the tokens, time them; returns the report."""
    import torch

    cfg = BenchConfig(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        vocab=vocab,
        rank=rank,
        batch=batch,
        seq=prompt,
    )
    with tempfile.TemporaryDirectory(prefix="jaxlora-e2e-") as tmp:
        setup = Setup.build(cfg, Path(tmp))
        names = [f"e{i}" for i in range(adapters)]
        bank, peft_model = setup.adapters("e2e", dict.fromkeys(names, rank))
    rows = [names[i % adapters] for i in range(batch)]
    tokens = setup.tokens(batch, prompt)
    stacked = jaxlora.stack(jaxlora.conform(bank))
    lora = stacked.route(rows)
    config = EngineConfig(
        rows=batch,
        max_len=prompt + new,
        chunks=(prompt,),
        prefill_tokens=prompt * batch,
        slots=1,
        decode_steps=decode_steps,
    )
    base_config = dataclasses.replace(config, slots=0)
    prompts = tokens.tolist()
    peft_model.generation_config.eos_token_id = None
    input_ids = torch.from_numpy(tokens).long()

    def ours():
        return generate(setup.model, prompts, lora=lora, max_new_tokens=new, config=config)

    def ours_base():  # the ceiling: the same engine and model with no LoRA at all
        return generate(setup.model, prompts, max_new_tokens=new, config=base_config)

    def theirs():
        with torch.inference_mode():
            return peft_model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                adapter_names=rows,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    mine = np.asarray(ours().tokens)
    peer = theirs()[:, prompt:].numpy()
    equal_rows = int((mine == peer).all(axis=1).sum())
    timings = time_interleaved(
        {"jaxlora": ours, "peft": theirs, "jaxlora-base": ours_base}, warmup=1, repeats=repeats
    )
    generated = batch * new
    tps = {k: generated / t.median_s for k, t in timings.items()}
    lora_s = timings["jaxlora"].median_s - timings["jaxlora-base"].median_s
    return {
        "description": (
            f"Llama hidden {hidden}, {layers} layers, vocab {vocab}; {batch} prompts x {prompt} "
            f"tokens, {new} new tokens each, {adapters} rank-{rank} adapters mixed over the rows"
        ),
        "results": [
            {"variant": k, "median_s": t.median_s, "min_s": t.min_s, "tokens_per_s": tps[k]}
            for k, t in timings.items()
        ],
        "ratios": {
            "jaxlora_vs_peft_tokens_per_s": ratio(tps["jaxlora"], tps["peft"]),
            # what the ratio would be if the 8 adapters cost nothing (same run)
            "ceiling_base_vs_peft_tokens_per_s": ratio(tps["jaxlora-base"], tps["peft"]),
            "lora_share_of_jaxlora_time": ratio(lora_s, timings["jaxlora"].median_s),
        },
        "targets": {"jaxlora_vs_peft_tokens_per_s": ">= 3"},
        "checks": {
            "rows_equal_peft": {"value": equal_rows, "of": batch, "ok": equal_rows == batch}
        },
        "engine_config": dataclasses.asdict(config),
        "timings": {k: t.as_json() for k, t in timings.items()},
        "machine": machine_info(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("hidden", 512),
        ("intermediate", 1376),
        ("layers", 4),
        ("heads", 8),
        ("vocab", 1024),
        ("batch", 32),
        ("prompt", 32),
        ("new", 32),
        ("adapters", 8),
        ("rank", 16),
        ("repeats", 5),
        ("decode_steps", 32),
    ]:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = vars(parser.parse_args(argv))
    out = args.pop("json")
    report = run(**args)
    for row in report["results"]:
        print(f"{row['variant']:<8} {row['median_s']:.3f} s  {row['tokens_per_s']:.1f} tokens/s")
    check = report["checks"]["rows_equal_peft"]
    print(f"rows equal to PEFT: {check['value']}/{check['of']}")
    ratios = report["ratios"]
    print(f"jaxlora / PEFT tokens/s: {ratios['jaxlora_vs_peft_tokens_per_s']:.2f}")
    print(f"ceiling (jaxlora base model / PEFT): {ratios['ceiling_base_vs_peft_tokens_per_s']:.2f}")
    print(f"share of jaxlora's time in the adapters: {ratios['lora_share_of_jaxlora_time']:.2f}")
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
