"""Test fixtures that need torch / transformers / PEFT (test dependencies only, never imported
by `jaxlora`): random transformers Llama checkpoints and PEFT adapter directories written by the
peers themselves, to check jaxlora's loaders and forward against them.

Example (in a test):
    base = write_llama_checkpoint(tmp_path / "llama", seed=0, vocab_size=64, hidden_size=16,
                                  intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2)
    peft_model = write_peft_adapters(base, tmp_path / "adapters", {"default": {"r": 2}})
"""

from __future__ import annotations

import os
from typing import Any


def write_llama_checkpoint(directory: str | os.PathLike, seed: int = 0, **config: Any):
    """Save a random `transformers` Llama (`save_pretrained`); returns the torch model.

    `config` are `transformers.LlamaConfig` fields. Norm weights get random offsets, so the
    test of them is not vacuous.
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

    `adapters` maps names to `peft.LoraConfig` fields; the first must be named "default" (saved
    in the root). Returns the `PeftModel`.
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


# The shared Llama test case (tests/test_generate.py, tests/test_engine_peft.py): a tiny
# transformers checkpoint config, three PEFT adapters, prompts of two lengths and their rows.
CONFIG = dict(
    vocab_size=80,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    initializer_range=0.2,
    eos_token_id=2,
    pad_token_id=0,
    bos_token_id=1,
)
ADAPTERS = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "wide": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    "ffn": {"r": 2, "lora_alpha": 6, "target_modules": ["gate_proj", "down_proj"]},
}
PROMPTS = [[1, 17, 42, 9], [1, 5], [1, 70, 3, 61], [1, 33], [1, 12, 8, 40]]
ROWS = ["wide", None, "default", "ffn", "wide"]
