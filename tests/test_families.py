"""Qwen2, Qwen3 and Mistral checkpoints in the one decoder, against transformers + PEFT
(specs/families.md §1). Tiny random models built with transformers' config classes, no download.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jaxlora  # noqa: E402
from jaxlora import reference  # noqa: E402
from jaxlora.errors import CheckpointError, ConfigError, UnsupportedFeatureError  # noqa: E402
from jaxlora.generate import generate  # noqa: E402
from jaxlora.models import Llama, LlamaConfig, forward, load_llama  # noqa: E402

BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
#: name -> (transformers config class, fields). Windows of 4 tokens are shorter than the
#: 8-token prompts, so prefill and decoding both cross them.
FAMILIES = {
    "qwen2": ("Qwen2Config", {}),
    "qwen2-sliding": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", dict(head_dim=12)),
    "mistral": ("MistralConfig", dict(sliding_window=4)),
}
ADAPTERS = {
    "default": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "rank_pattern": {"o_proj": 2},
        "alpha_pattern": {"down_proj": 5},
    },
    "attn": {"r": 3, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
}
TOKENS = np.array([[1, 5, 9, 33, 7, 60, 3, 11], [0, 0, 0, 4, 81, 17, 3, 90]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)
ROWS = ["default", None, "attn", "default"]
PROMPTS = [[1, 5, 9, 33, 7, 60, 3, 11], [4, 81, 17, 3, 90], [9, 8], [40, 41, 42, 43, 44, 45]]


def write_checkpoint(directory, config_class: str, seed: int, **fields):
    """A random transformers model of the family, saved; norms and biases get random offsets
    (HF initialises them to 1 and 0, which would make their tests vacuous)."""
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens=TOKENS, mask=MASK, **kwargs) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
            **kwargs,
        )
    return out.logits.double().numpy()


def assert_close(ours, theirs, mask=MASK):
    """SW-TOL-1 and an absolute 1e-4 (the issue's float32 bound), at real tokens."""
    real = mask.astype(bool)
    ours, theirs = np.asarray(ours, np.float64)[real], theirs[real]
    ok, err, bound = reference.allclose(ours, theirs, "float32")
    assert ok, f"max error {err:.3g} > SW-TOL-1 bound {bound:.3g}"
    assert np.abs(ours - theirs).max() < 1e-4


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    directory: Path
    peft_model: object
    model: Llama
    bank: jaxlora.AdapterBank


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> Family:
    """A family's checkpoint, its PEFT model over the transformers model, the jaxlora model and
    its adapter bank loaded from PEFT's files."""
    root = tmp_path_factory.mktemp(request.param)
    config_class, fields = FAMILIES[request.param]
    base = write_checkpoint(root / "model", config_class, seed=3, **(BASE | fields))
    torch.manual_seed(4)
    names = list(ADAPTERS)
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[names[0]]), names[0]
    )
    for name in names[1:]:
        peft_model.add_adapter(name, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
    peft_model.eval()
    peft_model.save_pretrained(root / "adapters")
    model = load_llama(root / "model")
    bank = jaxlora.io.load_peft(root / "adapters", layer_shapes=model.lora_shapes())
    return Family(request.param, root / "model", peft_model, model, bank)


@pytest.mark.clause("SW-FAM-1", "SW-FAM-3")
def test_logits_match_transformers(family):
    """SW-FAM-1, SW-FAM-3: each family's logits equal transformers' (left padding included),
    its config flags parsed from config.json; sliding windows shorter than the prompt too, and
    the window is not vacuous (tokens past it get other logits without it)."""
    name, peft_model, model = family.name, family.peft_model, family.model
    with peft_model.disable_adapter():
        theirs = hf_logits(peft_model)
    assert_close(forward(model, TOKENS, attention_mask=MASK), theirs)
    cfg = model.config
    assert cfg.model_type == name.split("-")[0]
    assert cfg.has_bias("self_attn.q_proj") == (name.startswith("qwen2"))
    assert not cfg.has_bias("self_attn.o_proj")
    assert cfg.qk_norm == (name == "qwen3")
    assert cfg.head_dim == (12 if name == "qwen3" else 8)
    windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
    expected = {"qwen2-sliding": [None, 4], "mistral": [4, 4]}.get(name, [None, None])
    assert windows == expected
    if cfg.sliding_window is not None:  # the window is applied: without it, other logits
        full = Llama(dataclasses.replace(cfg, sliding_window=None), model.tensors())
        windowed = np.asarray(forward(model, TOKENS[:1]))
        unwindowed = np.asarray(forward(full, TOKENS[:1]))
        np.testing.assert_allclose(windowed[0, :4], unwindowed[0, :4], atol=1e-6)
        assert np.abs(windowed[0, 4:] - unwindowed[0, 4:]).max() > 1e-3


@pytest.mark.clause("SW-FAM-4")
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_single_adapter_logits_match_peft(family, adapter):
    """SW-FAM-4: each adapter (rank/alpha patterns, rsLoRA) equals PEFT with it active."""
    peft_model, model, bank = family.peft_model, family.model, family.bank
    peft_model.set_adapter(adapter)
    ours = forward(model, TOKENS, attention_mask=MASK, lora=jaxlora.select(bank, adapter))
    assert_close(ours, hf_logits(peft_model))
    base = forward(model, TOKENS, attention_mask=MASK)
    assert np.abs(np.asarray(base) - np.asarray(ours)).max() > 1e-3


@pytest.mark.clause("SW-FAM-4")
def test_mixed_batch_and_greedy_generation_match_peft(family):
    """SW-FAM-4: a routed mixed batch equals PEFT's adapter_names= forward, and greedy
    generation (past the sliding window where there is one) equals PEFT's generate."""
    peft_model, model, bank = family.peft_model, family.model, family.bank
    tokens, mask = np.concatenate([TOKENS, TOKENS[::-1]]), np.concatenate([MASK, MASK[::-1]])
    names = [r or "__base__" for r in ROWS]
    stacked = jaxlora.stack(jaxlora.conform(bank))
    ours = forward(model, tokens, attention_mask=mask, lora=stacked.route(ROWS))
    assert_close(ours, hf_logits(peft_model, tokens, mask, adapter_names=names), mask)

    width = max(len(p) for p in PROMPTS)
    ids = np.array([[0] * (width - len(p)) + p for p in PROMPTS])
    pad_mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(pad_mask),
            adapter_names=names,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )
    theirs = out[:, width:].numpy()
    gen = generate(model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=6, stop_tokens=[2])
    for i, row in enumerate(gen.rows()):
        expected = theirs[i].tolist()
        if 2 in expected:
            expected = expected[: expected.index(2) + 1]
        assert row == expected, f"row {i} ({ROWS[i]})"


# -- config parsing and errors (SW-FAM-1 defaults, SW-FAM-2) -----------------------------------

#: 32 heads: Qwen's default of 32 KV heads (and Mistral's 8) must divide them.
SMALL = dict(hidden_size=128, num_attention_heads=32, num_hidden_layers=3, intermediate_size=40)
SMALL |= dict(vocab_size=64)


@pytest.mark.clause("SW-FAM-1")
@pytest.mark.parametrize(
    ("model_type", "config_class"),
    [("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config"), ("mistral", "MistralConfig")],
)
def test_missing_fields_take_the_family_defaults(model_type, config_class):
    """SW-FAM-1: fields absent from config.json take the transformers class's defaults
    (Qwen3's head_dim 128, Mistral's 4096-token window, Qwen's max_window_layers)."""
    hf = getattr(transformers, config_class)(**SMALL)
    ours = LlamaConfig.from_dict(SMALL | {"model_type": model_type})
    assert ours.head_dim == (getattr(hf, "head_dim", None) or 128 // 32)
    assert ours.sliding_window == hf.sliding_window
    assert (ours.num_key_value_heads, ours.rms_norm_eps) == (hf.num_key_value_heads, 1e-6)
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    if model_type != "mistral":
        qwen = SMALL | {"model_type": model_type, "use_sliding_window": True}
        qwen |= {"max_window_layers": 1}
        cfg = LlamaConfig.from_dict(qwen)
        assert list(cfg.layer_types) == getattr(transformers, config_class)(**qwen).layer_types
        assert [cfg.window(i) for i in range(3)] == [None, 4096, 4096]


@pytest.mark.clause("SW-FAM-2")
@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        (
            {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]},
            UnsupportedFeatureError,
            r"model_type='gemma' is not supported.*'qwen2' \(Qwen2ForCausalLM\).*"
            r"'mistral' \(MistralForCausalLM\)",
        ),
        (
            {"architectures": ["Qwen2ForSequenceClassification"]},
            UnsupportedFeatureError,
            r"architectures=\['Qwen2ForSequenceClassification'\].*implements Qwen2ForCausalLM",
        ),
        (
            {"layer_types": ["full_attention", "chunked_attention"]},
            UnsupportedFeatureError,
            r"layer_types \['chunked_attention'\] are not implemented",
        ),
        ({"layer_types": ["full_attention"]}, ConfigError, "layer_types has 1 entries"),
        (
            {"use_sliding_window": True, "sliding_window": 0},
            ConfigError,
            "sliding_window=0 must be a positive int",
        ),
    ],
)
def test_unsupported_families_and_layers_are_refused(tmp_path, changes, error, words):
    """SW-FAM-2: another family, a non-causal-LM architecture or an unknown layer type raises
    naming it and what is supported; a malformed window or layer list raises ConfigError."""
    directory = tmp_path / "qwen"
    directory.mkdir()
    raw = SMALL | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}
    raw |= {"num_hidden_layers": 2} | changes
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(error, match=words):
        load_llama(directory)


@pytest.mark.clause("SW-FAM-2")
def test_family_mismatched_with_its_weights_is_named(tmp_path):
    """SW-FAM-2 (with SW-LLAMA-2): a Qwen2 checkpoint relabelled as Llama holds q/k/v biases
    a Llama config does not use: the loader names them instead of dropping them."""
    directory = tmp_path / "relabelled"
    write_checkpoint(directory, "Qwen2Config", seed=0, **(BASE | {"num_hidden_layers": 1}))
    raw = json.loads((directory / "config.json").read_text())
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"does not use: .*q_proj\.bias"):
        load_llama(directory)
