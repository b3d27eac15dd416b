"""The bad-input matrix of jaxlora.io: each case raises a typed error with a useful message
(spec SW-IO-7, SW-IO-8, SW-IO-9, SW-IO-10)."""

from __future__ import annotations

import inspect
import json
import struct
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import (
    AdapterFormatError,
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
)
from jaxlora.io import (
    _save,
    load_peft,
    load_peft_adapter,
    prefix_key_map,
    save_peft,
    validate_against,
)
from jaxlora.io._safetensors import write_tensors

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def adapter(rank: int = 2, paths=("blocks.0.q", "blocks.1.v")) -> dict[str, jaxlora.LoraWeights]:
    rng = np.random.default_rng(rank)
    return {
        p: jaxlora.LoraWeights(
            jnp.asarray(rng.normal(size=(4, rank)), jnp.float32),
            jnp.asarray(rng.normal(size=(rank, 6)), jnp.float32),
            jnp.asarray(0.5, jnp.float32),
        )
        for p in paths
    }


@pytest.fixture
def saved(tmp_path) -> Path:
    save_peft(tmp_path / "ad", adapter())
    return tmp_path / "ad"


def edit_config(directory: Path, **changes) -> None:
    raw = json.loads((directory / CONFIG).read_text())
    raw.update(changes)
    (directory / CONFIG).write_text(json.dumps(raw))


# -- SW-IO-7: unsupported features ------------------------------------------------------------
REFUSED = [
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("use_dora", True, "use_dora=True"),
    ("lora_bias", True, "lora_bias=True"),
    ("bias", "all", "bias='all'"),
    ("bias", "lora_only", "bias='lora_only'"),
    ("modules_to_save", ["lm_head"], "modules_to_save=\\['lm_head'\\]"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("target_parameters", ["experts.w"], "target_parameters"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "olora", "init_lora_weights='olora'"),
    ("use_qalora", True, "use_qalora=True"),
]


@pytest.mark.clause("SW-IO-7")
@pytest.mark.parametrize(("field", "value", "message"), REFUSED)
def test_unsupported_config_feature_is_refused(saved, field, value, message):
    """SW-IO-7: a config field that would change the forward is refused, naming the field."""
    edit_config(saved, **{field: value})
    with pytest.raises(UnsupportedFeatureError, match=message) as info:
        load_peft(saved)
    assert CONFIG in str(info.value)


UNSUPPORTED_KEYS = [
    ("base_model.model.embed.lora_embedding_A", "embedding"),
    ("base_model.model.blocks.0.q.lora_magnitude_vector", "DoRA"),
    ("base_model.model.blocks.0.q.lora_B.bias", "lora_bias"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
]


@pytest.mark.clause("SW-IO-7")
@pytest.mark.parametrize(("key", "message"), UNSUPPORTED_KEYS)
def test_unsupported_weight_key_is_refused(saved, key, message):
    """SW-IO-7: embedding LoRA, DoRA, lora_bias and modules_to_save entries are refused."""
    write_tensors(saved / WEIGHTS, {key: np.ones((2, 4), np.float32)})
    with pytest.raises(UnsupportedFeatureError, match=message) as info:
        load_peft(saved)
    assert key in str(info.value)


@pytest.mark.clause("SW-IO-7")
def test_unknown_keys_warn_and_neutral_fields_are_accepted(saved):
    """SW-IO-7: unknown config keys are dropped with a warning; inference-neutral fields pass."""
    edit_config(saved, lora_dropout=0.1, task_type="CAUSAL_LM", fan_in_fan_out=True,
                some_future_field=3)  # fmt: skip
    with pytest.warns(UserWarning, match="some_future_field"):
        bank = load_peft(saved)
    assert np.array_equal(np.asarray(bank["default"]["blocks.0.q"].a),
                          np.asarray(adapter()["blocks.0.q"].a))  # fmt: skip


# -- SW-IO-8: malformed input -----------------------------------------------------------------
@pytest.mark.clause("SW-IO-8")
def test_missing_directory_config_and_weights(tmp_path, saved):
    """SW-IO-8: missing directory, config or weights name the path."""
    with pytest.raises(AdapterFormatError, match="no such adapter directory"):
        load_peft(tmp_path / "nowhere")
    (saved / WEIGHTS).unlink()
    with pytest.raises(AdapterFormatError, match="weights are missing"):
        load_peft_adapter(saved)
    (saved / CONFIG).unlink()
    with pytest.raises(AdapterFormatError, match=r"no adapter_config\.json"):
        load_peft_adapter(saved)
    with pytest.raises(AdapterFormatError, match="not a PEFT adapter directory"):
        load_peft(saved)


@pytest.mark.clause("SW-IO-8")
def test_pickle_is_never_loaded(saved):
    """SW-IO-8: a lone .bin is refused with the conversion recipe; its bytes are never read."""
    (saved / WEIGHTS).unlink()
    (saved / "adapter_model.bin").write_bytes(b"\x80\x04 this would be a pickle")
    with pytest.raises(AdapterFormatError, match="safe_serialization=True") as info:
        load_peft(saved)
    assert "never unpickles" in str(info.value)


@pytest.mark.clause("SW-IO-8")
@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
     ('{"r": "eight"}', "invalid LoRA config"), ('{"lora_alpha": "x"}', "lora_alpha")],
)  # fmt: skip
def test_bad_config_json(saved, text, message):
    """SW-IO-8: config text that is not a valid LoRA config is an AdapterFormatError."""
    (saved / CONFIG).write_text(text)
    with pytest.raises(AdapterFormatError, match=message):
        load_peft(saved)


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-7])
    elif how == "tiny":
        path.write_bytes(data[:3])
    elif how == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif how == "garbage_header":
        path.write_bytes(data[:8] + b"#" * 12 + data[20:])


@pytest.mark.clause("SW-IO-8")
@pytest.mark.parametrize(
    ("how", "message"),
    [("truncated", "not a valid safetensors"), ("tiny", "too short"),
     ("huge_header", "declares 1099511627776 bytes"),
     ("garbage_header", "not a valid safetensors")],
)  # fmt: skip
def test_corrupted_safetensors(saved, how, message):
    """SW-IO-8: truncated/corrupted files and absurd header sizes are refused, naming the file."""
    corrupt(saved / WEIGHTS, how)
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_peft(saved)
    assert WEIGHTS in str(info.value)


@pytest.mark.clause("SW-IO-8", "SW-IO-3")
def test_config_weight_rank_mismatch(saved):
    """SW-IO-8, SW-IO-3: a config rank that differs from the stored factors is refused."""
    edit_config(saved, r=3)
    with pytest.raises(AdapterFormatError, match=r"rank 2\).*config gives rank 3"):
        load_peft(saved)


@pytest.mark.clause("SW-IO-8")
@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"base_model.model.l0.weight": np.ones((2, 2), np.float32)}, "not a LoRA factor"),
        ({"base_model.model.l0.lora_A.weight": np.ones((2, 4), np.float32)}, "no lora_B"),
        ({"l0.lora_A.weight": np.ones((2, 4), np.int8),
          "l0.lora_B.weight": np.ones((4, 2), np.int8)}, "dtype I8"),
        ({}, "no LoRA factors"),
    ],
)  # fmt: skip
def test_bad_weight_keys_and_dtypes(saved, tensors, message):
    """SW-IO-8: non-LoRA keys, half pairs, integer dtypes and empty files are refused."""
    write_tensors(saved / WEIGHTS, tensors)
    with pytest.raises(AdapterFormatError, match=message):
        load_peft(saved)


@pytest.mark.clause("SW-IO-8", "SW-IO-2")
def test_key_map_collision(saved):
    """SW-IO-8, SW-IO-2: a key_map sending two modules to one path is an error."""
    with pytest.raises(AdapterFormatError, match="same path 'x'"):
        load_peft(saved, key_map=lambda p: "x")


# -- SW-IO-9: validation against the model ----------------------------------------------------
@pytest.mark.clause("SW-IO-9")
def test_paths_the_model_lacks_are_listed(saved):
    """SW-IO-9: every path the model lacks is listed, with the model's layers, and the advice
    names the key map arguments that exist."""
    missing = r"'blocks.0.q', 'blocks.1.v' \(2 layer\(s\)\)"
    with pytest.raises(TargetNotFoundError, match=missing) as e:
        load_peft(saved, layer_shapes={"other": (4, 6)})
    assert "Accepted paths: 'other'" in str(e.value)
    assert "`key_map=` of jaxlora.io.load_peft / load_peft_adapter" in str(e.value)
    for function in (load_peft, load_peft_adapter):
        assert "key_map" in inspect.signature(function).parameters


@pytest.mark.clause("SW-IO-2")
def test_prefix_key_map_renames_the_longest_prefix(saved):
    """SW-IO-2: prefix_key_map renames the longest matching path prefix and leaves other paths
    alone; as load_peft's key_map it fits an adapter to a model with other names; a prefix that
    is not a string raises ConfigError."""
    km = prefix_key_map({"blocks.": "model.layers.", "blocks.1.": "model.layers.9.", "": "x."})
    assert km("blocks.0.q") == "model.layers.0.q" and km("blocks.1.v") == "model.layers.9.v"
    assert km("head") == "x.head" and prefix_key_map({"a.": "b."})("c.a.d") == "c.a.d"
    shapes = {"model.layers.0.q": (4, 6), "model.layers.1.v": (4, 6)}
    km = prefix_key_map({"blocks.": "model.layers."})
    bank = load_peft(saved, key_map=km, layer_shapes=shapes)
    assert sorted(bank["default"]) == sorted(shapes)
    with pytest.raises(ConfigError, match=r"prefixes must be strings, got 1 -> 'x'"):
        prefix_key_map({1: "x"})


@pytest.mark.clause("SW-IO-9")
def test_shape_mismatch_with_model_layer(saved):
    """SW-IO-9: an adapter whose (in, out) differs from the layer names both shapes."""
    shapes = {"blocks.0.q": (4, 6), "blocks.1.v": (4, 7)}
    with pytest.raises(ShapeMismatchError, match=r"'blocks.1.v'.*\(4, 7\).*\(4, 6\)"):
        load_peft(saved, layer_shapes=shapes)
    chain = jaxlora.DenseChain.from_layers({"blocks.0.q": (np.ones((4, 6)), np.zeros(6))})
    with pytest.raises(TargetNotFoundError, match=r"blocks\.1\.v"):
        validate_against(adapter(), chain, name="mine")


# -- SW-IO-10: atomic saves and safe names ----------------------------------------------------
@pytest.mark.clause("SW-IO-10")
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "..\\x", ".hidden", "adapter_config.json"])
def test_unsafe_adapter_names_are_refused(tmp_path, name):
    """SW-IO-10: unsafe names raise ConfigError before anything is written."""
    with pytest.raises(ConfigError, match="not safe as a directory name"):
        save_peft(tmp_path / "ad", {"default": adapter(), name: adapter()})
    assert not (tmp_path / "ad").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.clause("SW-IO-10")
def test_failed_save_leaves_previous_directory(tmp_path, saved, monkeypatch):
    """SW-IO-10: a failure while writing leaves the old directory byte-identical, no temp dir."""
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    calls = []

    def failing_write(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return write_tensors(path, tensors, metadata)

    monkeypatch.setattr(_save, "write_tensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_peft(saved, {"default": adapter(3), "other": adapter(1)})
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]


@pytest.mark.clause("SW-IO-10")
def test_replace_existing_and_refuse_foreign_directory(tmp_path, saved):
    """SW-IO-10: an adapter directory is replaced whole; a foreign non-empty one is refused."""
    save_peft(saved, {"default": adapter(3)})
    assert load_peft(saved)["default"]["blocks.0.q"].rank == 3
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match="refusing to replace"):
        save_peft(foreign, adapter())
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json"]
