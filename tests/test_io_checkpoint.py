"""Writing Hugging Face checkpoints: `jaxlora.io.save_hf_checkpoint` (specs/io.md SW-IO-12) and
`jaxlora.models.save_llama` (specs/model.md SW-LLAMA-7), checked against transformers' own
loader and forward and against `load_llama`, in float32 and bfloat16."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from flax import nnx

from jaxlora.errors import CheckpointError, ConfigError
from jaxlora.io import MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME, read_tensors, save_hf_checkpoint
from jaxlora.models import Llama, LlamaConfig, forward, load_llama
from jaxlora.models.checkpoint import save_llama
from jaxlora.models.llama import expected_tensor_shapes

LLAMA3 = (
    ("factor", 4.0),
    ("low_freq_factor", 1.0),
    ("high_freq_factor", 2.0),
    ("original_max_position_embeddings", 16.0),
)
#: LlamaConfig(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, ...)
CONFIGS = {
    "mha-untied": LlamaConfig(96, 32, 48, 2, 4, 4, 8),
    "gqa-tied-theta500": LlamaConfig(96, 32, 48, 2, 4, 2, 8, rope_theta=500.0,
                                     tie_word_embeddings=True),
    "odd-24x3-mqa-bias": LlamaConfig(96, 24, 40, 2, 3, 1, 8, rope_theta=1e6,
                                     attention_bias=True, mlp_bias=True),
    "head-dim-12-eps": LlamaConfig(96, 24, 40, 1, 2, 1, 12, rms_norm_eps=1e-5),
    "llama3-rope": LlamaConfig(96, 32, 48, 2, 4, 2, 8, rope_type="llama3", rope=LLAMA3),
    "linear-rope": LlamaConfig(96, 32, 48, 2, 4, 4, 8, rope_theta=300.0, rope_type="linear",
                               rope=(("factor", 2.0),)),
}  # fmt: skip
TOKENS = np.array([[1, 5, 9, 33, 7, 60, 2, 11], [4, 81, 17, 3, 90, 0, 12, 95]], np.int64)


def random_tensors(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Weights of std 0.2 (norms 1 + 0.2 N(0, 1)): logits of order 1, so the 1e-4 bound bites."""
    rng = np.random.default_rng(seed)
    return {
        name: jnp.asarray(0.2 * rng.standard_normal(shape) + name.endswith("norm.weight"), dtype)
        for name, shape in expected_tensor_shapes(config).items()
    }


def random_llama(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> Llama:
    return Llama(config, random_tensors(config, seed, dtype))


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}")


def assert_same_model(loaded: Llama, saved: Llama) -> None:
    """Same config and every parameter bitwise identical, same dtype."""
    assert loaded.config == saved.config
    got, want = nnx.state(loaded, nnx.Param), nnx.state(saved, nnx.Param)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))


# -- SW-LLAMA-7: save_llama ---------------------------------------------------------------------


@pytest.mark.clause("SW-LLAMA-7")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_saved_llama_loads_in_transformers_with_the_same_logits(tmp_path, name):
    """SW-LLAMA-7: transformers' LlamaForCausalLM.from_pretrained reads a checkpoint save_llama
    wrote, and its float32 logits equal jaxlora's forward within 1e-4, for MHA/GQA/MQA, tied
    embeddings, biases, non-power-of-two head dims and linear / llama3 RoPE; load_llama gives
    the model back bitwise."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = random_llama(CONFIGS[name], seed=len(name))
    save_llama(tmp_path, model, config_fields={"eos_token_id": 2, "bos_token_id": 1})
    assert_same_model(load_llama(tmp_path), model)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.dtype == torch.float32 and hf.config.eos_token_id == 2
    with torch.no_grad():
        theirs = hf(torch.tensor(TOKENS)).logits.numpy()
    ours = np.asarray(forward(model, TOKENS))
    assert np.abs(ours).max() > 0.5  # not a vacuous comparison of near-zero logits
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.clause("SW-LLAMA-7")
def test_bfloat16_checkpoints_round_trip_bitwise(tmp_path):
    """SW-LLAMA-7: a bfloat16 Llama is stored as BF16 tensors with torch_dtype bfloat16 and comes
    back bitwise from load_llama; `dtype=` casts a float32 model on the way out; transformers
    loads the bf16 checkpoint as bf16 parameters with the same bits."""
    config = CONFIGS["gqa-tied-theta500"]
    model = random_llama(config, seed=3, dtype=jnp.bfloat16)
    save_llama(tmp_path / "bf16", model)
    stored = read_tensors(tmp_path / "bf16" / MODEL_WEIGHTS_NAME)
    assert {a.dtype for a in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert "lm_head.weight" not in stored  # tied, as transformers saves it
    assert json.loads((tmp_path / "bf16" / MODEL_CONFIG_NAME).read_text())["torch_dtype"] == (
        "bfloat16"
    )
    assert_same_model(load_llama(tmp_path / "bf16"), model)

    save_llama(tmp_path / "cast", random_llama(config, seed=4), dtype=jnp.bfloat16)
    cast = {k: jnp.asarray(v, jnp.bfloat16) for k, v in random_tensors(config, seed=4).items()}
    assert_same_model(load_llama(tmp_path / "cast"), Llama(config, cast))

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    q = hf.model.layers[1].self_attn.q_proj.weight
    assert q.dtype == torch.bfloat16
    ours = np.asarray(model.layers[1].q_proj.kernel[...]).T
    np.testing.assert_array_equal(q.detach().view(torch.int16).numpy(), bits(ours).view(np.int16))


@pytest.mark.clause("SW-LLAMA-7")
def test_save_llama_writes_what_save_pretrained_writes(tmp_path):
    """SW-LLAMA-7: the files are config.json + model.safetensors (metadata format "pt"); tensors
    carry HF names with `[out, in]` weights; the config holds the architecture fields."""
    model = random_llama(CONFIGS["odd-24x3-mqa-bias"], seed=1)
    save_llama(tmp_path, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME]
    with safetensors.safe_open(tmp_path / MODEL_WEIGHTS_NAME, "np") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        k = f.get_tensor("model.layers.1.self_attn.k_proj.weight")
    assert "model.layers.0.mlp.down_proj.bias" in names and "lm_head.weight" in names
    assert len(names) == len(expected_tensor_shapes(model.config))
    np.testing.assert_array_equal(k, np.asarray(model.layers[1].k_proj.kernel[...]).T)
    config = json.loads((tmp_path / MODEL_CONFIG_NAME).read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["head_dim"], config["attention_bias"]) == (
        1,
        8,
        True,
    )
    save_llama(tmp_path / "l3", random_llama(CONFIGS["llama3-rope"]))
    rope = json.loads((tmp_path / "l3" / MODEL_CONFIG_NAME).read_text())["rope_scaling"]
    assert rope == {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 2.0,
        "original_max_position_embeddings": 16,
    }
    assert isinstance(rope["original_max_position_embeddings"], int)


@pytest.mark.clause("SW-LLAMA-7")
def test_config_fields_cannot_contradict_the_model(tmp_path):
    """SW-LLAMA-7: config_fields that the model determines raise ConfigError naming them;
    nothing is written."""
    model = random_llama(CONFIGS["mha-untied"])
    with pytest.raises(ConfigError, match=r"config_fields sets \['hidden_size', 'torch_dtype'\]"):
        save_llama(tmp_path / "x", model, config_fields={"hidden_size": 8, "torch_dtype": "f"})
    assert not (tmp_path / "x").exists()


# -- SW-IO-12: save_hf_checkpoint -------------------------------------------------------------


@pytest.mark.clause("SW-IO-12")
def test_checkpoint_replaces_a_checkpoint_but_not_foreign_files(tmp_path):
    """SW-IO-12: an existing checkpoint directory is replaced whole; a non-empty directory without
    config.json is refused with CheckpointError and left as it was; a file path too."""
    tensors = {"w.weight": np.ones((2, 2), np.float32)}
    extra = {"extra": np.zeros(1, np.int32)}
    save_hf_checkpoint(tmp_path / "ck", tensors | extra, {"model_type": "a"})
    save_hf_checkpoint(tmp_path / "ck", tensors, {"model_type": "b"})
    assert sorted(read_tensors(tmp_path / "ck" / MODEL_WEIGHTS_NAME)) == ["w.weight"]
    assert json.loads((tmp_path / "ck" / MODEL_CONFIG_NAME).read_text()) == {"model_type": "b"}
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(
        CheckpointError, match=r"without a checkpoint \(config.json\); refusing to "
    ):
        save_hf_checkpoint(foreign, tensors, {"model_type": "a"})
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_hf_checkpoint(foreign / "notes.txt", tensors, {"model_type": "a"})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.clause("SW-IO-12")
@pytest.mark.parametrize(
    ("tensors", "config", "message"),
    [
        ({}, {"model_type": "a"}, "needs a non-empty mapping `HF tensor name -> array`"),
        ({"": np.ones(1)}, {"model_type": "a"}, "names must be non-empty strings, got ''"),
        ({"w": np.array([object()])}, {"model_type": "a"}, "tensor 'w' has dtype object"),
        ({"w": np.ones(2, np.complex64)}, {"model_type": "a"}, "tensor 'w' has dtype complex64"),
        ({"w": np.ones(1)}, {"hidden_size": 4}, "mapping with a string `model_type`"),
        ({"w": np.ones(1)}, {"model_type": "a", "x": {1, 2}}, "not JSON-serialisable"),
        ({"w": np.ones(1)}, {"model_type": "a", "eps": math.nan}, "finite float"),
    ],
)
def test_bad_checkpoint_contents_are_refused_before_writing(tmp_path, tensors, config, message):
    """SW-IO-12: tensors or a config that cannot be stored raise ConfigError naming the tensor or
    the problem, and nothing is written."""
    with pytest.raises(ConfigError, match=message):
        save_hf_checkpoint(tmp_path / "ck", tensors, config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.clause("SW-LLAMA-7")
def test_writing_another_family_is_refused_by_name(tmp_path):
    """SW-LLAMA-7: `save_llama` writes Llama checkpoints only; a Qwen3 model is refused with an
    error naming its model_type, and nothing is written."""
    from jaxlora.errors import UnsupportedFeatureError
    from jaxlora.models import Llama, LlamaConfig, save_llama

    config = LlamaConfig.from_dict(
        {
            "model_type": "qwen3",
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 8,
        }
    )
    with pytest.raises(UnsupportedFeatureError, match="'qwen3' checkpoint is not supported"):
        save_llama(tmp_path / "out", Llama.random(config))
    assert not (tmp_path / "out").exists()
