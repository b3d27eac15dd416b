"""`jaxlora demo`: one batch whose rows use different PEFT adapters on a tiny Llama.

On first use it writes, into a cache directory (`$JAXLORA_CACHE`, default
`~/.cache/jaxlora/demo`), a tiny random Llama checkpoint (transformers `save_pretrained`) and a
PEFT directory with 4 adapters (different ranks, targets, rsLoRA, rank/alpha patterns); later runs
reuse them. Then it generates one mixed batch (rows on different adapters and on the base), checks
every row against the same row generated alone with `jaxlora.select` (spec SW-CLI-1), prints a
table, tokens/s and the decode-step compiles the two mixed batches added (1 in a fresh process, 0
if the step was already compiled; the second batch, a new adapter assignment, must add none), and
exits 1 on any mismatch or recompilation; `--max-new-tokens` below 2 exits 2.

Example:
    $ jaxlora demo
    $ JAXLORA_CACHE=/tmp/demo jaxlora demo --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_ADAPTERS",
    "DEMO_MODEL",
    "add_arguments",
    "cache_dir",
    "ensure_demo_files",
    "run",
    "write_llama_checkpoint",
    "write_peft_adapters",
]

#: The tiny Llama the demo builds (transformers.LlamaConfig fields): GQA, odd head count.
DEMO_MODEL: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

#: The demo's adapters (peft.LoraConfig fields); the first is PEFT's "default".
DEMO_ADAPTERS: dict[str, dict[str, Any]] = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "wide-rs": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    "mlp-only": {
        "r": 2,
        "lora_alpha": 3,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "alpha_pattern": {"down_proj": 7},
    },
    "attn-pattern": {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "rank_pattern": {"o_proj": 3},
    },
}


def cache_dir() -> Path:
    """`$JAXLORA_CACHE` or `~/.cache/jaxlora/demo`."""
    env = os.environ.get("JAXLORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jaxlora" / "demo"


def _atomic_dir(target: Path, write) -> None:
    """Write a directory under a temporary name, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_llama_checkpoint(directory: str | os.PathLike, seed: int = 0, **config: Any):
    """Save a random `transformers` Llama (`save_pretrained`); returns the torch model.

    Norm weights get random offsets, so the test of them is not vacuous.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def write_peft_adapters(base, directory, adapters: dict[str, dict[str, Any]], seed: int = 0):
    """Wrap `base` with PEFT adapters (random A and B) and `save_pretrained` them.

    Returns the `PeftModel`; the first adapter must be named "default" (saved in the root).
    """
    import peft
    import torch

    torch.manual_seed(seed)
    names = list(adapters)
    first = peft.LoraConfig(init_lora_weights=False, **adapters[names[0]])
    model = peft.get_peft_model(base, first, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **adapters[name]))
    model.eval()
    model.save_pretrained(directory)
    return model


def ensure_demo_files(root: Path) -> tuple[Path, Path]:
    """Create (once) the demo checkpoint and adapters under `root`; returns their directories."""
    model_dir, adapter_dir = root / "llama", root / "adapters"
    if not (model_dir / "config.json").is_file():
        _atomic_dir(model_dir, lambda d: write_llama_checkpoint(d, seed=0, **DEMO_MODEL))
    if not (adapter_dir / "adapter_config.json").is_file():
        import transformers

        def write(d: Path) -> None:
            base = transformers.LlamaForCausalLM.from_pretrained(model_dir)
            write_peft_adapters(base, d, DEMO_ADAPTERS, seed=1)

        _atomic_dir(adapter_dir, write)
    return model_dir, adapter_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per row")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where to keep the demo files (default $JAXLORA_CACHE or ~/.cache/jaxlora/demo)",
    )


def _rows() -> tuple[list[list[int]], list[str | None]]:
    # Two prompt lengths (left padding in the batch, few shapes for the single-row references).
    prompts = [
        [1, 17, 42, 9, 5],
        [1, 5, 8],
        [1, 88, 3, 61, 27],
        [1, 33, 7],
        [1, 99, 12],
        [1, 64, 4],
    ]
    adapters: list[str | None] = ["default", None, "wide-rs", "mlp-only", "attn-pattern", "wide-rs"]
    return prompts, adapters


def run(args: argparse.Namespace) -> int:
    import jaxlora
    from jaxlora.generate import compile_counts, generate
    from jaxlora.models import load_llama

    if args.max_new_tokens < 2:
        print(
            f"jaxlora demo: error: --max-new-tokens must be at least 2 (the decode step only runs "
            f"from the second token on), got {args.max_new_tokens}.",
            file=sys.stderr,
        )
        return 2
    root = args.cache_dir or cache_dir()
    model_dir, adapter_dir = ensure_demo_files(root)
    model = load_llama(model_dir)
    bank = jaxlora.io.load_peft(adapter_dir, layer_shapes=model.lora_shapes())
    stacked = jaxlora.stack(jaxlora.conform(bank))
    prompts, adapters = _rows()
    n = args.max_new_tokens
    stop = [DEMO_MODEL["eos_token_id"]]
    before = compile_counts()["decode"]
    mixed = generate(model, stacked, prompts, adapters, max_new_tokens=n, stop_tokens=stop)
    # Differences of the cache size, not its absolute value: the first batch compiles the step
    # once, or not at all when this process already compiled it for these shapes.
    first = compile_counts()["decode"] - before
    # The same rows with the adapters rotated: a new assignment, which must not recompile.
    rotated = adapters[1:] + adapters[:1]
    again = generate(model, stacked, prompts, rotated, max_new_tokens=n, stop_tokens=stop)
    second = compile_counts()["decode"] - before - first
    compiles = first + second
    conformed = jaxlora.conform(bank)
    print(f"model {model_dir}  adapters {adapter_dir}: {', '.join(bank.names)}")
    print(f"{'row':>3}  {'adapter':<13} {'prompt':<26} {'generated':<48} alone")
    ok = True
    for i, (prompt, name, row) in enumerate(zip(prompts, adapters, mixed.rows(), strict=True)):
        alone = generate(
            model, conformed, [prompt], name, max_new_tokens=n, stop_tokens=stop
        ).rows()[0]
        same = alone == row
        ok &= same
        print(
            f"{i:>3}  {name or '(base)':<13} {prompt!s:<26} {row!s:<48} {'yes' if same else 'NO'}"
        )
    tokens = int(again.lengths.sum())
    print(
        f"tokens/s: {tokens / again.seconds:.1f} (second mixed batch, compiled: {tokens} tokens "
        f"in {again.seconds:.3f} s; first batch incl. compilation {mixed.seconds:.2f} s)"
    )
    print(
        f"decode-step compiles for 2 mixed batches with different adapter assignments: {compiles}"
    )
    if not ok or first > 1 or second != 0:
        print(
            "FAILED: a row differs from its single-adapter generation, or the decode step "
            "recompiled.",
            file=sys.stderr,
        )
        return 1
    print("all rows match their single-adapter generation")
    return 0
