"""Back to files after training: `unstack`, `trim`, and a trained adapter in PEFT with its
original rank, alpha and targets (spec SW-TRAIN-6)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hf_fixtures import write_llama_checkpoint

import jaxlora
from jaxlora import reference, train
from jaxlora.bank import trim, unstack
from jaxlora.errors import (
    AdapterNotFoundError,
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
)
from jaxlora.models import load_llama
from jaxlora.types import LoraWeights, StackedBank

SHAPES = {"l0": (6, 5), "l1": (5, 4), "l2": (4, 4)}


def bank_of_mixed_adapters() -> jaxlora.AdapterBank:
    """Different ranks, targets and dtypes (conform promotes bfloat16 to float32)."""
    a = jaxlora.init_adapter(
        jax.random.key(0),
        jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["l0", "l1"], init_lora_weights=False),
        SHAPES,
    )
    b = jaxlora.init_adapter(
        jax.random.key(1),
        jaxlora.LoraConfig(r=3, lora_alpha=9, target_modules=["l2"], init_lora_weights=False),
        SHAPES,
        dtype=jnp.bfloat16,
    )
    return jaxlora.AdapterBank({"a": a, "b": b})


def assert_same_bank(x, y):
    assert x.names == y.names
    for name in x.names:
        assert set(x[name]) == set(y[name]), name
        for path, w in x[name].items():
            v = y[name][path]
            for f in ("a", "b", "scale"):
                p, q = getattr(w, f), getattr(v, f)
                assert p.dtype == q.dtype and p.shape == q.shape, (name, path, f)
                assert np.array_equal(np.asarray(p, np.float32), np.asarray(q, np.float32))


@pytest.mark.clause("SW-TRAIN-6")
def test_unstack_inverts_stack_and_trim_inverts_conform():
    """SW-TRAIN-6: `unstack(stack(b))` is `b` bitwise; `trim(conformed, like=original)` and
    `trim` without `like` both give back each adapter's own targets and ranks (and, with
    `like`, its dtypes), the scales untouched."""
    bank = bank_of_mixed_adapters()
    conformed = jaxlora.conform(bank, max_rank=5)
    assert_same_bank(unstack(jaxlora.stack(conformed)), conformed)
    assert_same_bank(trim(unstack(jaxlora.stack(conformed)), like=bank), bank)
    guessed = trim(conformed)
    assert {n: {p: w.rank for p, w in ad.items()} for n, ad in guessed.items()} == {
        "a": {"l0": 2, "l1": 2},
        "b": {"l2": 3},
    }
    one = trim(conformed["b"], like=bank["b"])
    assert list(one) == ["l2"] and one["l2"].a.dtype == jnp.bfloat16
    assert float(one["l2"].scale) == 3.0


@pytest.mark.clause("SW-TRAIN-6")
def test_unstack_and_trim_errors_name_the_adapter_and_layer():
    """SW-TRAIN-6: a non-stacked argument, slot arrays that disagree with the names, a non-zero
    padding column or padded layer, a `like` without the adapter, with a target the adapter
    lacks, or with a larger rank raise jaxlora errors naming adapter and layer."""
    bank = bank_of_mixed_adapters()
    conformed = jaxlora.conform(bank, max_rank=4)
    with pytest.raises(ConfigError, match="expects a StackedBank"):
        unstack(conformed)
    stacked = jaxlora.stack(conformed)
    with pytest.raises(ShapeMismatchError, match="2 slots of weights but 1 names"):
        unstack(StackedBank(stacked.weights, ("a",)))
    w = conformed["a"]["l0"]
    moved = conformed.replace(
        "a", {**conformed["a"], "l0": LoraWeights(w.a, w.b.at[3, 0].set(1.0), w.scale)}
    )
    with pytest.raises(
        ConfigError,
        match=r"adapter 'a', layer 'l0': trim would drop non-zero .*rank columns 2\.\.3",
    ):
        trim(moved, like=bank)
    w = conformed["a"]["l2"]
    moved = conformed.replace(
        "a", {**conformed["a"], "l2": LoraWeights(w.a.at[0, 0].set(1.0), w.b, w.scale)}
    )
    with pytest.raises(ConfigError, match=r"layer 'l2': trim would drop .*the whole layer"):
        trim(moved, like=bank)
    with pytest.raises(AdapterNotFoundError, match="`like` has no adapter 'b'"):
        trim(conformed, like=jaxlora.AdapterBank({"a": bank["a"]}))
    with pytest.raises(TargetNotFoundError, match=r"original targets 'l9'"):
        trim(conformed["a"], like={**bank["a"], "l9": bank["a"]["l0"]})
    with pytest.raises(ConfigError, match="takes the bank before conform"):
        trim(conformed, like=bank["a"])
    big = LoraWeights(jnp.ones((6, 5)), jnp.ones((5, 5)), jnp.asarray(1.0))
    with pytest.raises(ShapeMismatchError, match="original has rank 5"):
        trim(conformed["a"], like={**bank["a"], "l0": big})


HF = dict(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
)
ORIGINAL = {
    "default": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "mlp": {"r": 4, "lora_alpha": 16, "target_modules": ["down_proj"]},
}


@pytest.mark.clause("SW-TRAIN-6")
def test_trained_adapters_go_back_to_peft_with_their_own_rank_alpha_targets(tmp_path):
    """SW-TRAIN-6: conform -> stack -> 4 mixed-batch adam steps -> unstack -> trim -> save_peft
    writes each adapter with its original r, lora_alpha and target modules, and PEFT's forward
    of each saved adapter equals jaxlora's (SW-TOL-1), as does the routed trained batch."""
    import peft
    import torch

    base = write_llama_checkpoint(tmp_path / "llama", seed=0, **HF)
    model = load_llama(tmp_path / "llama")
    lm = train.from_llama(model)
    bank = jaxlora.AdapterBank(
        {
            name: jaxlora.init_adapter(jax.random.key(i), jaxlora.LoraConfig(**f), lm.shapes)
            for i, (name, f) in enumerate(ORIGINAL.items())
        }
    )
    stacked = jaxlora.stack(jaxlora.conform(bank))
    opt = optax.adam(2e-2)
    step, state = train.make_slots_step(opt, lm.logits, dropout=0.1), train.init_slots(opt, stacked)
    rng = np.random.default_rng(0)
    for k in range(4):
        ex = [([1], rng.integers(2, 40, 5).tolist()) for _ in range(4)]
        batch = train.make_batch(ex, 6, ids=[0, 1, 0, 1])
        state, _ = step(state, lm.base, batch, jax.random.key(k))
    trained_stack = train.stacked_of(state, stacked.names)
    trained = trim(unstack(trained_stack), like=bank)
    jaxlora.io.save_peft(tmp_path / "out", trained)
    tokens = np.asarray([[1, 5, 9, 3, 7], [2, 8, 4, 4, 6]], np.int32)
    routed = np.asarray(lm.logits(lm.base, tokens, trained_stack.route(["default", "mlp"])))
    for row, (name, fields) in enumerate(ORIGINAL.items()):
        directory = tmp_path / "out" / ("" if name == "default" else name)
        cfg = json.loads((directory / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (
            fields["r"], fields["lora_alpha"], {}, {}
        )  # fmt: skip
        assert set(cfg["target_modules"]) == set(bank[name])
        assert all(p.endswith(tuple(fields["target_modules"])) for p in cfg["target_modules"])
        assert any(np.any(np.asarray(w.b)) for w in trained[name].values())
        peft_model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
        with torch.no_grad():
            want = peft_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        base = peft_model.unload()
        got = np.asarray(lm.logits(lm.base, tokens, trained[name]))
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, (name, err, allowed)
        ok, err, allowed = reference.allclose(routed[row], want[row], "float32")
        assert ok, (name, err, allowed)
