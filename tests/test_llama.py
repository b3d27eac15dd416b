"""The Llama reference model against transformers (+ PEFT) on PyTorch (specs/model.md)."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_fixtures import write_llama_checkpoint, write_peft_adapters  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora import reference  # noqa: E402
from jaxlora.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
)
from jaxlora.models import (  # noqa: E402
    KVCache,
    forward,
    forward_with_cache,
    init_cache,
    load_llama,
)
from jaxlora.models import llama as llama_module  # noqa: E402

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    initializer_range=0.2,
)
CONFIGS = {
    "mha-untied": {},
    "gqa-tied-theta500": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
    "odd-24x3-mqa-bias": dict(
        hidden_size=24,
        num_attention_heads=3,
        num_key_value_heads=1,
        intermediate_size=40,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
    "llama3-rope": dict(
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 2.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "linear-rope": dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 300.0, "factor": 2.0}
    ),
}
TOKENS = np.array([[1, 5, 9, 33, 7, 60, 2, 11], [0, 0, 0, 4, 81, 17, 3, 90]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)


def hf_logits(model, tokens=TOKENS, mask=MASK, **kwargs) -> np.ndarray:
    """transformers logits with generate()'s positions for left padding."""
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
            **kwargs,
        )
    return out.logits.double().numpy()


def assert_close_at_real_tokens(ours, theirs, mask=MASK):
    real = mask.astype(bool)
    ok, err, bound = reference.allclose(np.asarray(ours)[real], theirs[real], "float32")
    assert ok, f"max error {err:.3g} > SW-TOL-1 bound {bound:.3g}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = write_llama_checkpoint(directory, seed=3, **(BASE | CONFIGS[request.param]))
    return directory, model


@pytest.mark.clause("SW-LLAMA-1")
def test_logits_match_transformers(checkpoint):
    """SW-LLAMA-1: logits equal transformers' for several configs, left padding included."""
    directory, hf = checkpoint
    model = load_llama(directory)
    ours = forward(model, TOKENS, attention_mask=MASK)
    assert_close_at_real_tokens(ours, hf_logits(hf))


@pytest.mark.clause("SW-LLAMA-1")
def test_sharded_checkpoint_loads_identically(tmp_path):
    """SW-LLAMA-1: a sharded safetensors index gives the same logits as transformers."""
    hf = write_llama_checkpoint(tmp_path / "one", seed=4, **BASE)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = forward(load_llama(tmp_path / "sharded"), TOKENS, attention_mask=MASK)
    assert_close_at_real_tokens(ours, hf_logits(hf))


@pytest.mark.clause("SW-LLAMA-6")
def test_kv_cache_decoding_equals_full_forward(tmp_path):
    """SW-LLAMA-6: prefill + one-token steps give the full forward's logits."""
    write_llama_checkpoint(tmp_path, seed=5, **(BASE | CONFIGS["gqa-tied-theta500"]))
    model = load_llama(tmp_path)
    full = np.asarray(forward(model, TOKENS, attention_mask=MASK))
    cache = init_cache(model.config, 2, 10, model.dtype)
    assert isinstance(cache, KVCache)
    logits, cache = forward_with_cache(model, TOKENS[:, :5], cache, attention_mask=MASK[:, :5])
    steps = [np.asarray(logits)]
    for t in range(5, 8):
        logits, cache = forward_with_cache(model, TOKENS[:, t : t + 1], cache)
        steps.append(np.asarray(logits))
    assert_close_at_real_tokens(np.concatenate(steps, axis=1), full.astype(np.float64))
    assert int(cache.index) == 8 and np.asarray(cache.next_pos).tolist() == [8, 5]
    with pytest.raises(ShapeMismatchError, match="10 slots and 8 are used"):
        forward_with_cache(model, TOKENS[:, :3], cache)


# -- errors (SW-LLAMA-2) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    write_llama_checkpoint(directory, seed=0, **(BASE | {"num_hidden_layers": 1}))
    return directory


def _edited_copy(src, dst, **changes):
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw.update(changes)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.clause("SW-LLAMA-2")
@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"model_type": "gpt2"}, UnsupportedFeatureError, "model_type='gpt2' is not supported"),
        ({"hidden_act": "gelu"}, UnsupportedFeatureError, "hidden_act='gelu'"),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
            UnsupportedFeatureError,
            r"rope_type='yarn' is not implemented",
        ),
        ({"intermediate_size": 50}, ShapeMismatchError, r"mlp\.\w+_proj\.weight' has shape"),
        ({"num_hidden_layers": 2}, CheckpointError, "model.layers.1"),
        ({"num_hidden_layers": 0, "intermediate_size": 48}, CheckpointError, "does not use"),
    ],
)
def test_config_and_tensor_errors(small_dir, tmp_path, changes, error, words):
    """SW-LLAMA-2: unsupported configs and mismatched tensors raise, naming what is wrong."""
    directory = _edited_copy(small_dir, tmp_path / "edited", **changes)
    with pytest.raises(error, match=words):
        load_llama(directory)


@pytest.mark.clause("SW-LLAMA-2")
def test_missing_lm_head_is_named(tmp_path):
    """SW-LLAMA-2: a tied checkpoint whose config says untied lacks lm_head.weight."""
    tied = BASE | {"num_hidden_layers": 1, "tie_word_embeddings": True}
    write_llama_checkpoint(tmp_path / "tied", seed=1, **tied)
    directory = _edited_copy(tmp_path / "tied", tmp_path / "untied", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"lacks tensors the config needs: 'lm_head\.weight'"):
        load_llama(directory)


@pytest.mark.clause("SW-LLAMA-2")
def test_missing_files_and_pickles_are_refused(small_dir, tmp_path):
    """SW-LLAMA-2: missing directory / config / weights, and pickle-only checkpoints."""
    with pytest.raises(CheckpointError, match="not a directory"):
        load_llama(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_llama(tmp_path / "empty")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(small_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="never loads"):
        load_llama(pickled)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_llama(pickled)


# -- adapters (SW-LLAMA-3..5) --------------------------------------------------------------------

ADAPTERS = {
    "default": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rs": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    # Not "mlp": PEFT 0.21 save_pretrained drops every key containing ".<other adapter name>.",
    # so an adapter named like a module ("mlp") strips the MLP weights of the other adapters.
    "ffn": {
        "r": 2,
        "lora_alpha": 3,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "alpha_pattern": {"down_proj": 7},
    },
    "attn": {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["k_proj", "o_proj"],
        "rank_pattern": {"o_proj": 3},
    },
}


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
    """A GQA checkpoint, 4 PEFT adapters saved with save_pretrained, loaded back by jaxlora."""
    root = tmp_path_factory.mktemp("peft")
    base = write_llama_checkpoint(root / "llama", seed=7, **(BASE | {"num_key_value_heads": 2}))
    peft_model = write_peft_adapters(base, root / "adapters", ADAPTERS, seed=8)
    model = load_llama(root / "llama")
    bank = jaxlora.io.load_peft(root / "adapters", layer_shapes=model.lora_shapes())
    return peft_model, model, bank


@pytest.mark.clause("SW-LLAMA-3")
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_single_adapter_logits_match_peft(peft_setup, name):
    """SW-LLAMA-3: each adapter's logits equal transformers+PEFT with it active."""
    peft_model, model, bank = peft_setup
    peft_model.set_adapter(name)
    theirs = hf_logits(peft_model)
    ours = forward(model, TOKENS, attention_mask=MASK, lora=jaxlora.select(bank, name))
    assert_close_at_real_tokens(ours, theirs)
    base = forward(model, TOKENS, attention_mask=MASK)
    assert not np.allclose(np.asarray(base), np.asarray(ours), atol=1e-3)


@pytest.mark.clause("SW-LLAMA-4")
def test_mixed_batch_matches_peft_adapter_names(peft_setup):
    """SW-LLAMA-4: Routed rows equal PEFT's adapter_names forward and the single forwards."""
    peft_model, model, bank = peft_setup
    rows = ["rs", None, "attn", "ffn"]
    tokens = np.concatenate([TOKENS, TOKENS[::-1]])
    mask = np.concatenate([MASK, MASK[::-1]])
    theirs = hf_logits(peft_model, tokens, mask, adapter_names=[r or "__base__" for r in rows])
    conformed = jaxlora.conform(bank)
    stacked = jaxlora.stack(conformed)
    routed = jaxlora.Routed(stacked, jnp.asarray(stacked.ids(rows)))
    ours = forward(model, tokens, attention_mask=mask, lora=routed)
    assert_close_at_real_tokens(ours, theirs, mask)
    for i, name in enumerate(rows):
        alone = forward(
            model,
            tokens[i : i + 1],
            attention_mask=mask[i : i + 1],
            lora=jaxlora.select(conformed, name),
        )
        assert_close_at_real_tokens(
            np.asarray(ours)[i : i + 1], np.asarray(alone, np.float64), mask[i : i + 1]
        )


@pytest.mark.clause("SW-LLAMA-5")
def test_forward_compiles_once_for_all_adapters(peft_setup):
    """SW-LLAMA-5: one compilation for every selection of a conformed bank and every routing."""
    _, model, bank = peft_setup
    conformed = jaxlora.conform(bank)
    tokens = TOKENS[:, :3]  # a shape no other test uses
    before = llama_module._forward_jit._cache_size()
    for name in conformed.names:
        forward(model, tokens, lora=jaxlora.select(conformed, name))
    assert llama_module._forward_jit._cache_size() - before == 1
    stacked = jaxlora.stack(conformed)
    for rows in (["rs", "ffn"], [None, "default"], ["attn", "attn"]):
        forward(model, tokens, lora=stacked.route(rows))
    assert llama_module._forward_jit._cache_size() - before == 2


@pytest.mark.clause("SW-LLAMA-3")
def test_adapter_that_does_not_fit_the_model_raises(peft_setup):
    """SW-LLAMA-3: unknown paths and wrong shapes raise, naming path and shapes."""
    _, model, _ = peft_setup
    w = jaxlora.LoraWeights(jnp.ones((32, 2)), jnp.ones((2, 32)), jnp.asarray(1.0))
    with pytest.raises(TargetNotFoundError, match=r"model\.layers\.0\.attn\.q"):
        forward(model, TOKENS, lora={"model.layers.0.attn.q": w})
    bad = jaxlora.LoraWeights(jnp.ones((32, 2)), jnp.ones((2, 7)), jnp.asarray(1.0))
    with pytest.raises(
        ShapeMismatchError, match=r"'model\.layers\.1\.mlp\.up_proj': the layer maps \(32, 48\)"
    ):
        forward(model, TOKENS, lora={"model.layers.1.mlp.up_proj": bad})
    stacked = jaxlora.stack(jaxlora.conform(peft_setup[2]))
    with pytest.raises(ShapeMismatchError, match="one slot id per row"):
        forward(model, TOKENS, lora=jaxlora.Routed(stacked, jnp.asarray([0, 1, 2])))
    with pytest.raises(ConfigError, match=r"got str \(a name: use jaxlora\.select\(bank, 'rs'\)\)"):
        forward(model, TOKENS, lora="rs")
