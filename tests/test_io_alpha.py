"""`save_peft` writes the adapter's own alpha, not `float32(scale) * r` (spec SW-IO-14)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxlora

SHAPES = {"blocks.0.q": (8, 8), "blocks.0.v": (8, 8)}


@pytest.mark.clause("SW-IO-14")
@pytest.mark.parametrize(("r", "alpha"), [(3, 16), (7, 0.1), (5, 12.5), (6, 1e-3), (11, 33)])
def test_saved_alpha_is_the_configured_one(tmp_path, r, alpha):
    """SW-IO-14: r and lora_alpha round-trip exactly through adapter_config.json (16 / 3 in
    float32 times 3 is 16.000000476837158), with no alpha_pattern, and loading gives back the
    same float32 scale."""
    cfg = jaxlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q", "v"])
    adapter = jaxlora.init_adapter(jax.random.key(0), cfg, SHAPES)
    jaxlora.io.save_peft(tmp_path / "out", jaxlora.AdapterBank({"default": adapter}))
    written = json.loads((tmp_path / "out" / jaxlora.io.ADAPTER_CONFIG_NAME).read_text())
    assert (written["r"], written["lora_alpha"], written["alpha_pattern"]) == (r, alpha, {})
    back, config = jaxlora.io.load_peft_adapter(tmp_path / "out")
    assert (config.r, config.lora_alpha) == (r, alpha)
    for path, w in adapter.items():
        assert np.float32(back[path].scale) == np.float32(w.scale)
