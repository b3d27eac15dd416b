"""Training benchmark: 8 adapters in one mixed-batch step vs 8 single-adapter steps vs PEFT.

On one random Llama (a `transformers` checkpoint loaded by both sides), 8 adapters (rank
`rank` on all 7 projections, random A and B), a batch of `rows` rows x `seq` tokens, `rows / 8`
rows per adapter (the first `prompt` tokens of each row are a masked prompt):

- `mixed8`: one `jaxlora.train.make_slots_step` step training all 8 adapters, each on its own
  rows (adamw, per-slot optimizer state);
- `single_x8`: 8 `jaxlora.train.make_step` steps, one per adapter on its rows (one compiled
  step serves them all);
- `peft_x1/threads<k>`: PEFT's training step (forward, `backward`, `torch.optim.AdamW.step`)
  for one adapter on its rows, torch on 1 thread and on every core; PEFT cannot train two
  adapters in one batch, so training all 8 is 8 such steps (`peft_x8 = 8 * peft_x1`, the
  faster thread count). `mixed8/<routing>` is timed for each kernel.

Before timing, PEFT's loss and jaxlora's loss of adapter 0 on the same rows are compared under
SW-TOL-1. Memory (XLA's compiled memory analysis of the mixed step): arguments (base weights,
adapter state, batch) and temporaries, against the same step compiled to also differentiate
the base model: their difference is what base-gradient buffers would cost, which the LoRA step
does not pay; plus the activation residuals the backward keeps.

Run: `python -m benchmarks.train` (defaults below; `--tiny` for a smoke run, `--json-dir DIR`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora import train
from jaxlora.models import load_llama

from ._harness import format_table, machine_info, ratio, time_interleaved, write_report

NAME = "train"
ROUTINGS = ("gather", "onehot", "ragged")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULTS = {
    "hidden": 256,
    "intermediate": 688,
    "layers": 2,
    "heads": 4,
    "vocab": 512,
    "rank": 8,
    "adapters": 8,
    "rows": 32,
    "seq": 32,
    "prompt": 8,
    "repeats": 5,
}
TINY = {**DEFAULTS, "hidden": 32, "intermediate": 64, "layers": 1, "heads": 2, "vocab": 64,
        "rank": 2, "rows": 16, "seq": 8, "prompt": 2, "repeats": 1}  # fmt: skip
LR = 1e-3


def _tree_bytes(tree: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _peft_model(root: Path, adapter: dict) -> Any:
    """PEFT on the same checkpoint with `adapter` (saved by jaxlora; lora_dropout 0), trainable."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(root / "llama")
    jaxlora.io.save_peft(root / "adapter0", adapter)
    model = peft.PeftModel.from_pretrained(base, str(root / "adapter0"), is_trainable=True)
    return model.train()


def run(cfg: dict[str, Any], json_dir: Path | None = None, peft: bool = True) -> dict[str, Any]:
    from tests.hf_fixtures import write_llama_checkpoint

    n, rows = cfg["adapters"], cfg["rows"]
    if rows % n:
        raise SystemExit(f"--rows {rows} must be a multiple of --adapters {n}")
    root = Path(tempfile.mkdtemp(prefix="jaxlora-train-bench-"))
    write_llama_checkpoint(
        root / "llama",
        seed=0,
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["heads"],
    )
    lm_model = load_llama(root / "llama")
    lm = train.from_llama(lm_model)
    lora = jaxlora.LoraConfig(
        r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules=list(PROJECTIONS),
        init_lora_weights=False,
    )  # fmt: skip
    bank = jaxlora.AdapterBank(
        {f"a{i}": jaxlora.init_adapter(jax.random.key(i), lora, lm.shapes) for i in range(n)}
    )
    stacked = jaxlora.stack(bank)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg["vocab"], (rows, cfg["seq"]), dtype=np.int32)
    mask = np.ones_like(tokens)
    mask[:, : cfg["prompt"]] = 0
    ids = np.repeat(np.arange(n, dtype=np.int32), rows // n)
    batch = train.Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids))
    own = [train.Batch(batch.tokens[ids == i], batch.loss_mask[ids == i]) for i in range(n)]

    opt = optax.adamw(LR)
    key = jax.random.key(0)
    mixed_steps = {
        routing: train.make_slots_step(opt, train.from_llama(lm_model, routing=routing).logits)
        for routing in ROUTINGS
    }
    mixed_step = mixed_steps["gather"]  # what routing="auto" picks for rows of many tokens
    single_step = train.make_step(opt, lm.logits)
    singles = [train.init(opt, bank[f"a{i}"]) for i in range(n)]

    def mixed_variant(step):
        holder = [train.init_slots(opt, stacked)]

        def go():
            holder[0], m = step(holder[0], lm.base, batch, key)
            return m

        return go

    def run_singles():
        out = []
        for i in range(n):
            singles[i], m = single_step(singles[i], lm.base, own[i], key)
            out.append(m)
        return out

    variants = {f"mixed8/{r}": mixed_variant(step) for r, step in mixed_steps.items()}
    variants["single_x8"] = run_singles
    checks: dict[str, Any] = {}
    if peft:
        import torch

        model = _peft_model(root, bank["a0"])
        params = [p for p in model.parameters() if p.requires_grad]
        torch_opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-4)
        input_ids = torch.from_numpy(np.asarray(own[0].tokens)).long()
        labels = input_ids.clone()
        labels[torch.from_numpy(np.asarray(own[0].loss_mask)) == 0] = -100
        with torch.no_grad():
            want = float(model(input_ids=input_ids, labels=labels).loss)
        got = float(train.lm_loss(lm.logits(lm.base, own[0].tokens, bank["a0"]), *own[0][:2]))
        err = abs(got - want) / (1 + abs(want))
        checks["peft_loss_agreement"] = {
            "value": err, "limit": 1e-4, "ok": err <= 1e-4, "jaxlora": got, "peft": want
        }  # fmt: skip

        def peft_variant(threads: int):
            def go():
                torch.set_num_threads(threads)
                torch_opt.zero_grad(set_to_none=True)
                loss = model(input_ids=input_ids, labels=labels).loss
                loss.backward()
                torch_opt.step()

            return go

        # torch with every core, and with one thread (faster when the cores are shared:
        # OpenMP threads waiting on each other under load).
        for threads in sorted({1, os.cpu_count() or 1}):
            variants[f"peft_x1/threads{threads}"] = peft_variant(threads)
    timings = time_interleaved(variants, warmup=1, repeats=cfg["repeats"])
    med = {k: v.median_s for k, v in timings.items()}
    best = min(ROUTINGS, key=lambda r: med[f"mixed8/{r}"])
    ratios = {f"single_x8_over_mixed8/{r}": ratio(med["single_x8"], med[f"mixed8/{r}"])
              for r in ROUTINGS}  # fmt: skip
    if peft:
        peft_best = min(med[k] for k in med if k.startswith("peft_x1"))
        ratios[f"peft_x8_over_mixed8/{best}"] = ratio(8 * peft_best, med[f"mixed8/{best}"])
        ratios["peft_x1_over_single"] = ratio(peft_best, med["single_x8"] / n)

    # Memory: the mixed step as compiled, and the same step also differentiating the base.
    state = train.init_slots(opt, stacked)
    analysis = mixed_step.lower(state, lm.base, batch, key).compile().memory_analysis()

    def loss(trainable, base):
        sel = jaxlora.Routed(jaxlora.StackedBank(train.join(trainable, state.frozen),
                                                 stacked.names), batch.ids)  # fmt: skip
        logits = lm.logits(base, batch.tokens, sel)
        sums, counts = train.group_sums(logits, batch.tokens, batch.loss_mask, batch.ids, n)
        return (sums / jnp.maximum(counts, 1)).sum()

    lora_only = jax.jit(jax.grad(loss)).lower(state.trainable, lm.base).compile()
    with_base = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state.trainable, lm.base).compile()
    try:
        from jax._src.ad_checkpoint import saved_residuals

        residuals = sum(
            int(np.prod(r.shape)) * r.dtype.itemsize
            for r, source in saved_residuals(loss, state.trainable, lm.base)
            if "argument" not in source  # inputs (weights, factors) are not activations
        )
    except Exception:  # a private JAX helper: report nothing rather than guess
        residuals = None
    forward = jax.jit(lm.logits).lower(lm.base, batch.tokens, None).compile()
    memory = {
        "base_param_bytes": _tree_bytes(lm.base),
        "adapter_state_bytes": _tree_bytes(state),
        "batch_bytes": _tree_bytes(batch),
        "step_argument_bytes": analysis.argument_size_in_bytes,
        "step_temp_bytes": analysis.temp_size_in_bytes,
        "grad_lora_only_temp_bytes": lora_only.memory_analysis().temp_size_in_bytes,
        "grad_with_base_temp_bytes": with_base.memory_analysis().temp_size_in_bytes,
        "base_forward_temp_bytes": forward.memory_analysis().temp_size_in_bytes,
        "jaxpr_residual_bytes_before_fusion": residuals,
    }
    report = {
        "name": NAME,
        "machine": machine_info(),
        "config": cfg,
        "checks": checks,
        "timings": {k: v.as_json() for k, v in timings.items()},
        "ratios": ratios,
        "memory": memory,
        "compiles": {
            "mixed8": {r: f._cache_size() for r, f in mixed_steps.items()},
            "single": single_step._cache_size(),
        },
    }
    print(format_table([{"variant": k, "median_ms": 1e3 * v} for k, v in med.items()]))
    print(format_table([{"ratio": k, "value": v} for k, v in ratios.items()]))
    print(format_table([{"memory": k, "MB": (v or 0) / 2**20} for k, v in memory.items()]))
    print("checks:", checks)
    write_report(json_dir, NAME, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__)
    for k, v in DEFAULTS.items():
        parser.add_argument(f"--{k}", type=int, default=v)
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT variant")
    parser.add_argument("--json-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = dict(TINY) if args.tiny else {k: getattr(args, k) for k in DEFAULTS}
    report = run(cfg, args.json_dir, peft=not args.no_peft)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
