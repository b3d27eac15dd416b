"""The engine as a server runs it (host store, LRU slots, continuous batching) against PEFT.

The shared Llama test case of `tests/hf_fixtures.py` (same checkpoint config, adapters,
prompts and rows): every request's greedy tokens equal `transformers` + PEFT `generate(
adapter_names=...)` with the same stop token, with 2 rows for 5 requests (rows are refilled) and
2 device slots for 3 adapters (swap-ins while others decode).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hf_fixtures import (  # noqa: E402
    ADAPTERS,
    CONFIG,
    PROMPTS,
    ROWS,
    write_llama_checkpoint,
    write_peft_adapters,
)

import jaxlora  # noqa: E402
from jaxlora.engine import Engine, EngineConfig, Request  # noqa: E402
from jaxlora.models import load_llama  # noqa: E402


@pytest.mark.clause("SW-ENGINE-2", "SW-GEN-2")
def test_engine_greedy_tokens_equal_peft_generate(tmp_path):
    """SW-ENGINE-2, SW-GEN-2: 5 requests on 2 rows and 2 device slots for 3 adapters; each
    request's tokens equal PEFT generate(adapter_names=...) on the left-padded batch."""
    base = write_llama_checkpoint(tmp_path / "llama", seed=11, **CONFIG)
    peft_model = write_peft_adapters(base, tmp_path / "adapters", ADAPTERS, seed=12)
    model = load_llama(tmp_path / "llama")
    bank = jaxlora.io.load_peft(tmp_path / "adapters", layer_shapes=model.lora_shapes())
    width = max(map(len, PROMPTS))
    ids = np.array([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            adapter_names=[r or "__base__" for r in ROWS],
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    theirs = out[:, width:].numpy().tolist()
    config = EngineConfig(rows=2, max_len=16, chunks=(2, 4), prefill_tokens=4, slots=2, rank=8)
    engine = Engine(model, config, adapters={n: bank[n] for n in bank})
    requests = [
        Request(tuple(p), 10, name, stop_tokens=(2,)) for p, name in zip(PROMPTS, ROWS, strict=True)
    ]
    results = engine.generate(requests)
    for i, result in enumerate(results):
        expected = theirs[i][: theirs[i].index(2) + 1] if 2 in theirs[i] else theirs[i]
        assert result.tokens == expected, (i, ROWS[i])
    assert engine.metrics()["adapters"]["swap_ins"] >= 3
