"""`jaxlora demo-llama`: one batch whose rows use different PEFT adapters on a tiny Llama.

On first use it writes, into a cache directory (`$JAXLORA_CACHE`, default
`~/.cache/jaxlora/demo`), a tiny random Llama checkpoint (`jaxlora.models.save_llama`: the files
transformers' `save_pretrained` writes) and a PEFT directory with 4 adapters (different ranks,
targets, rsLoRA, rank/alpha patterns; `jaxlora.io.save_peft`); later runs reuse them. Only the
package's own dependencies are needed: no torch, transformers or peft. Then it generates one
mixed batch (rows on different adapters and on the base), checks every row against the same row
generated alone with `jaxlora.select` (spec SW-CLI-1), prints a table, tokens/s and the
decode-step compiles the two mixed batches added (1 in a fresh process, 0 if the step was
already compiled; the second batch, a new adapter assignment, must add none), and exits 1 on any
mismatch or recompilation; `--max-new-tokens` below 2 exits 2.

Example:
    $ jaxlora demo-llama
    $ JAXLORA_CACHE=/tmp/demo jaxlora demo-llama --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_ADAPTERS",
    "DEMO_CONFIG",
    "DEMO_TOKENS",
    "add_arguments",
    "cache_dir",
    "demo_bank",
    "demo_model",
    "ensure_demo_files",
    "run",
]

#: The tiny Llama the demo builds (`jaxlora.models.LlamaConfig` fields): GQA, odd head count.
DEMO_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 8,
}

#: Special token ids written to the checkpoint's config.json (`eos_token_id` stops generation).
DEMO_TOKENS: dict[str, int] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

#: Standard deviation of the random weights (norm weights: 1 + this * N(0, 1)); large enough
#: that greedy tokens are far from ties.
DEMO_INIT_STD = 0.2

#: The demo's adapters (`jaxlora.LoraConfig` / PEFT field names); the first is "default".
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


def demo_model(seed: int = 0):
    """The demo's random float32 `jaxlora.models.Llama` (`DEMO_CONFIG`, `DEMO_INIT_STD`).

    Example:
        >>> demo_model().lora_shapes()["model.layers.0.self_attn.k_proj"]
        (48, 16)
    """
    import numpy as np

    from jaxlora.models import Llama, LlamaConfig
    from jaxlora.models.llama import expected_tensor_shapes

    config = LlamaConfig(**DEMO_CONFIG)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_tensor_shapes(config).items():
        value = DEMO_INIT_STD * rng.standard_normal(shape) + float(name.endswith("norm.weight"))
        tensors[name] = value.astype(np.float32)
    return Llama(config, tensors)


def demo_bank(layer_shapes: dict[str, tuple[int, int]], seed: int = 1):
    """The `DEMO_ADAPTERS` as an `AdapterBank`, random A and B (`jaxlora.init_adapter`).

    Example:
        >>> bank = demo_bank(demo_model().lora_shapes())
        >>> bank.names, bank["mlp-only"]["model.layers.1.mlp.down_proj"].rank
        (('default', 'wide-rs', 'mlp-only', 'attn-pattern'), 2)
    """
    import jax

    import jaxlora

    bank = jaxlora.AdapterBank()
    for i, (name, fields) in enumerate(DEMO_ADAPTERS.items()):
        config = jaxlora.LoraConfig(init_lora_weights=False, **fields)
        key = jax.random.fold_in(jax.random.key(seed), i)
        bank = bank.add(name, jaxlora.init_adapter(key, config, layer_shapes))
    return bank


def ensure_demo_files(root: Path) -> tuple[Path, Path]:
    """Create (once) the demo checkpoint and adapters under `root`; returns their directories.

    Both are written atomically (a run interrupted while writing leaves nothing half-written).
    """
    import jaxlora
    from jaxlora.models import read_config
    from jaxlora.models.checkpoint import save_llama

    model_dir, adapter_dir = root / "llama", root / "adapters"
    if not (model_dir / jaxlora.io.MODEL_CONFIG_NAME).is_file():
        save_llama(model_dir, demo_model(seed=0), config_fields=DEMO_TOKENS)
    if not (adapter_dir / jaxlora.io.ADAPTER_CONFIG_NAME).is_file():
        shapes = read_config(model_dir).linear_shapes()
        jaxlora.io.save_peft(adapter_dir, demo_bank(shapes, seed=1))
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
    from jaxlora.errors import JaxLoraError
    from jaxlora.generate import compile_counts, generate
    from jaxlora.models import load_llama

    if args.max_new_tokens < 2:
        print(
            f"jaxlora demo-llama: error: --max-new-tokens must be at least 2 (the decode step "
            f"only runs from the second token on), got {args.max_new_tokens}.",
            file=sys.stderr,
        )
        return 2
    root = args.cache_dir or cache_dir()
    try:
        model_dir, adapter_dir = ensure_demo_files(root)
    except (JaxLoraError, OSError) as err:
        print(
            f"jaxlora demo-llama: error: cannot write the demo files under {root}: {err} "
            "Point --cache-dir or $JAXLORA_CACHE at a new or empty directory.",
            file=sys.stderr,
        )
        return 2
    model = load_llama(model_dir)
    bank = jaxlora.io.load_peft(adapter_dir, layer_shapes=model.lora_shapes())
    stacked = jaxlora.stack(jaxlora.conform(bank))
    prompts, adapters = _rows()
    n = args.max_new_tokens
    stop = [DEMO_TOKENS["eos_token_id"]]
    before = compile_counts()["decode"]
    mixed = generate(
        model, prompts, lora=stacked.route(adapters), max_new_tokens=n, stop_tokens=stop
    )
    # Differences of the cache size, not its absolute value: the first batch compiles the step
    # once, or not at all when this process already compiled it for these shapes.
    first = compile_counts()["decode"] - before
    # The same rows with the adapters rotated: a new assignment, which must not recompile.
    rotated = adapters[1:] + adapters[:1]
    again = generate(
        model, prompts, lora=stacked.route(rotated), max_new_tokens=n, stop_tokens=stop
    )
    second = compile_counts()["decode"] - before - first
    compiles = first + second
    conformed = jaxlora.conform(bank)
    print(f"model {model_dir}  adapters {adapter_dir}: {', '.join(bank.names)}")
    print(f"{'row':>3}  {'adapter':<13} {'prompt':<26} {'generated':<48} alone")
    ok = True
    for i, (prompt, name, row) in enumerate(zip(prompts, adapters, mixed.rows(), strict=True)):
        single = jaxlora.select(conformed, name)
        alone = generate(model, [prompt], lora=single, max_new_tokens=n, stop_tokens=stop)
        alone = alone.rows()[0]
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
