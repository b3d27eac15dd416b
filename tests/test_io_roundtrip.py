"""Round trips between jaxlora, disk and PEFT, compared on outputs (spec SW-IO-1..6).

Models are the SW-MODEL-1 chain with transformers-like paths, in JAX (`jaxlora.DenseChain`)
and PyTorch (the peft driver's `TorchChain`), from the same NumPy weights; and one tiny
`LlamaForCausalLM` built from a config with random weights (no download).
"""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference
from jaxlora.io import load_peft, load_peft_adapter, read_tensors, save_peft

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from conformance.drivers.peft_driver import TorchChain  # noqa: E402

PATHS = ["model.layers.0.q_proj", "model.layers.0.v_proj", "model.layers.1.q_proj", "lm_head"]
WIDTHS = [8, 12, 8, 10, 6]


def base_layers(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (p, rng.normal(size=(WIDTHS[i], WIDTHS[i + 1])) / 3, rng.normal(size=WIDTHS[i + 1]) / 3)
        for i, p in enumerate(PATHS)
    ]


def jax_chain(layers, dtype=jnp.float32) -> jaxlora.DenseChain:
    return jaxlora.DenseChain.from_layers({p: (w, c) for p, w, c in layers}, dtype)


def oracle(layers, x, adapters):
    """The float64 oracle for the active adapters `[{path: LoraWeights}]` (SW-FORWARD-1)."""
    h = np.asarray(x, np.float64)
    for i, (path, w, c) in enumerate(layers):
        terms = [
            (np.asarray(ad[path].a, np.float64), np.asarray(ad[path].b, np.float64),
             float(ad[path].scale))
            for ad in adapters if path in ad
        ]  # fmt: skip
        h = reference.layer_forward(h, w, c, terms)
        if i < len(layers) - 1:
            h = np.tanh(h)
    return h


def assert_close(y, y_ref, dtype="float32"):
    ok, err, allowed = reference.allclose(y, y_ref, dtype)
    assert ok, f"max error {err:.3g} > allowed {allowed:.3g}"


def sample_bank(layers) -> jaxlora.AdapterBank:
    """Several adapters: different ranks, rsLoRA, rank/alpha patterns, different targets."""
    shapes = jax_chain(layers).layer_shapes()
    configs = {
        "default": jaxlora.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj"]),
        "math": jaxlora.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "lm_head"],
            rank_pattern={"v_proj": 1},
            alpha_pattern={"lm_head": 3.5},
        ),
        "rs": jaxlora.LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=".*proj"),
    }
    rng = np.random.default_rng(7)
    bank = jaxlora.AdapterBank()
    for name, cfg in configs.items():
        factors = {}
        for path in jaxlora.match_targets(cfg.target_modules, shapes):
            (d_in, d_out), r = shapes[path], cfg.rank_for(path)
            factors[path] = (rng.normal(size=(d_in, r)) / 3, rng.normal(size=(r, d_out)) / 3)
        bank = bank.add(name, jaxlora.make_adapter(cfg, factors, dtype=jnp.float32))
    return bank


@pytest.mark.clause("SW-IO-5", "SW-IO-1", "SW-IO-4")
def test_jaxlora_disk_jaxlora_is_bitwise(tmp_path):
    """SW-IO-5, SW-IO-1, SW-IO-4: save_peft -> load_peft returns identical arrays and dtypes,
    with "default" in the root and the other adapters in sub-directories."""
    bank = sample_bank(base_layers())
    half = {p: jaxlora.LoraWeights(w.a.astype(jnp.bfloat16), w.b.astype(jnp.bfloat16), w.scale)
            for p, w in bank["rs"].items()}  # fmt: skip
    bank = bank.replace("rs", half)
    save_peft(tmp_path / "ad", bank)
    assert (tmp_path / "ad" / "adapter_config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "ad").iterdir() if p.is_dir()) == ["math", "rs"]
    loaded = load_peft(tmp_path / "ad")
    assert sorted(loaded.names) == sorted(bank.names)
    for name in bank.names:
        assert set(loaded[name]) == set(bank[name])
        for path, w in bank[name].items():
            v = loaded[name][path]
            for got, want in ((v.a, w.a), (v.b, w.b), (v.scale, w.scale)):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(np.asarray(got), np.asarray(want)), (name, path)
    header = json.loads((tmp_path / "ad" / "rs" / "adapter_config.json").read_text())
    assert header["peft_type"] == "LORA" and header["use_rslora"] is False
    assert all(a.dtype.name == "bfloat16" for a in read_tensors(
        tmp_path / "ad" / "rs" / "adapter_model.safetensors").values())  # fmt: skip


@pytest.mark.clause("SW-IO-6", "SW-IO-1")
def test_save_peft_then_peft_loads_same_outputs(tmp_path):
    """SW-IO-6, SW-IO-1: PEFT's from_pretrained / load_adapter on save_peft's directory gives
    jaxlora's outputs and the oracle's, for every adapter and for two active at once."""
    layers = base_layers(1)
    bank = sample_bank(layers)
    save_peft(tmp_path / "ad", bank, base_model_name_or_path="tiny-chain")
    x = np.random.default_rng(2).normal(size=(5, WIDTHS[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(TorchChain(layers), str(tmp_path / "ad"))
        for name in ("math", "rs"):
            model.load_adapter(str(tmp_path / "ad" / name), adapter_name=name)
    model.eval()
    chain = jax_chain(layers)
    for active in ("default", "math", "rs", ["math", "rs"]):
        if isinstance(active, str):
            model.set_adapter(active)
        else:
            model.base_model.set_adapter(active)
        with torch.no_grad():
            y_peft = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
        selected = jaxlora.select(bank, active)
        y_jax = np.asarray(jaxlora.forward(chain, jnp.asarray(x, jnp.float32), lora=selected))
        y_ref = oracle(layers, x, selected.adapters)
        assert_close(y_peft, y_ref)
        assert_close(y_jax, y_ref)


def peft_saved_model(layers, directory):
    """A PEFT model with three adapters (patterns, rsLoRA, other targets), saved to disk."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        TorchChain(layers),
        peft.LoraConfig(
            r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            rank_pattern={"v_proj": 3}, alpha_pattern={"layers.1.q_proj": 7},
        ),
    )  # fmt: skip
    model.add_adapter(
        "rs",
        peft.LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=r".*\.q_proj",
                        init_lora_weights=False),
    )  # fmt: skip
    model.add_adapter(
        "head", peft.LoraConfig(r=1, lora_alpha=2, target_modules=["lm_head"],
                                init_lora_weights=False)
    )  # fmt: skip
    model.eval()
    model.save_pretrained(str(directory))
    return model


def peft_terms(model, name):
    """The oracle's view of PEFT's in-memory adapter `name`: path -> LoraWeights (float64)."""
    out = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            a = module.lora_A[name].weight.detach().double().numpy().T
            b = module.lora_B[name].weight.detach().double().numpy().T
            out[path] = jaxlora.LoraWeights(a, b, np.float64(module.scaling[name]))
    return out


@pytest.mark.clause("SW-IO-6", "SW-IO-3", "SW-IO-9")
def test_peft_save_then_load_peft_same_outputs(tmp_path):
    """SW-IO-6, SW-IO-3, SW-IO-9: load_peft of PEFT's save_pretrained gives PEFT's forward (and
    the oracle's) for each adapter and for a multi-adapter active set."""
    layers = base_layers(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_saved_model(layers, tmp_path / "ad")
    chain = jax_chain(layers)
    bank = load_peft(tmp_path / "ad", layer_shapes=chain)
    assert sorted(bank.names) == ["default", "head", "rs"]
    x = np.random.default_rng(4).normal(size=(3, WIDTHS[0]))
    for active in ("default", "rs", "head", ["default", "head"]):
        if isinstance(active, str):
            model.set_adapter(active)
        else:
            model.base_model.set_adapter(active)
        with torch.no_grad():
            y_peft = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
        names = [active] if isinstance(active, str) else active
        y_ref = oracle(layers, x, [peft_terms(model, n) for n in names])
        selected = jaxlora.select(bank, active)
        y_jax = jaxlora.forward(chain, jnp.asarray(x, jnp.float32), lora=selected)
        assert_close(y_peft, y_ref)
        assert_close(np.asarray(y_jax), y_ref)
        for n in names:  # the scales jaxlora computed are PEFT's
            for path, w in peft_terms(model, n).items():
                assert float(bank[n][path].scale) == pytest.approx(float(w.scale), rel=1e-7)


@pytest.mark.clause("SW-IO-2", "SW-IO-3")
def test_key_map_and_patterns_resolve_on_module_path(tmp_path):
    """SW-IO-2, SW-IO-3: a key_map renames paths; patterns still resolve against the PEFT module
    path; save_peft with the inverse map writes the original keys."""
    layers = base_layers(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_saved_model(layers, tmp_path / "ad")
    to_jax = lambda p: p.replace("model.layers.", "blocks.")  # noqa: E731
    to_peft = lambda p: p.replace("blocks.", "model.layers.")  # noqa: E731
    adapter, config = load_peft_adapter(tmp_path / "ad", key_map=to_jax)
    assert set(adapter) == {"blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj"}
    assert config.alpha_pattern == {"layers.1.q_proj": 7}
    expected = peft_terms(model, "default")
    for path, w in adapter.items():
        assert float(w.scale) == pytest.approx(float(expected[to_peft(path)].scale), rel=1e-7)
    save_peft(tmp_path / "again", adapter, key_map=to_peft)
    before = read_tensors(tmp_path / "ad" / "adapter_model.safetensors")
    after = read_tensors(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    raw = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert raw["target_modules"] == sorted(to_peft(p) for p in adapter)


@pytest.mark.clause("SW-IO-4", "SW-IO-1")
def test_dtype_kept_or_cast_and_names_subset(tmp_path):
    """SW-IO-4, SW-IO-1: stored float16 stays float16, dtype= casts; names= picks adapters and an
    unknown name is an error listing those found."""
    bank = sample_bank(base_layers())
    f16 = {p: jaxlora.LoraWeights(w.a, w.b, w.scale) for p, w in bank["math"].items()}
    save_peft(tmp_path / "ad", bank, dtype=np.float16)
    kept = load_peft(tmp_path / "ad", names=["math"])
    assert kept.names == ("math",)
    assert all(w.a.dtype == jnp.float16 for w in kept["math"].values())
    cast = load_peft(tmp_path / "ad", names=["math"], dtype=jnp.float32)
    for path, w in cast["math"].items():
        assert w.a.dtype == jnp.float32
        want = np.asarray(f16[path].a).astype(np.float16).astype(np.float32)
        assert np.array_equal(np.asarray(w.a), want)
    with pytest.raises(jaxlora.errors.AdapterNotFoundError, match=r"'nope'.*'default'"):
        load_peft(tmp_path / "ad", names=["nope"])


@pytest.mark.clause("SW-IO-2", "SW-IO-6")
def test_llama_adapter_paths_and_deltas(tmp_path):
    """SW-IO-2, SW-IO-6: a PEFT adapter of a tiny LlamaForCausalLM loads under transformers'
    module paths, fits the model's layers, and each layer's delta equals PEFT's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(
            transformers.LlamaForCausalLM(config),
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            rank_pattern={"layers.1.self_attn.v_proj": 2}, init_lora_weights=False),
        )  # fmt: skip
        model.save_pretrained(str(tmp_path / "llama"))
    shapes = {}  # every dense layer of the model, LoRA-wrapped or not
    for name, m in model.base_model.model.named_modules():
        linear = getattr(m, "base_layer", m)
        if (
            isinstance(linear, torch.nn.Linear)
            and ".lora_" not in name
            and "base_layer" not in name
        ):
            shapes[name] = (linear.in_features, linear.out_features)
    bank = load_peft(tmp_path / "llama", layer_shapes=shapes)
    expected = {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    assert set(bank["default"]) == expected
    assert bank["default"]["model.layers.1.self_attn.v_proj"].rank == 2
    for path, w in bank["default"].items():
        layer = model.base_model.model.get_submodule(path)
        want = layer.get_delta_weight("default").detach().double().numpy().T
        assert np.allclose(np.asarray(w.delta(), np.float64), want, rtol=1e-5, atol=1e-6)


@pytest.mark.clause("SW-IO-6")
def test_pattern_keys_do_not_match_longer_paths(tmp_path):
    """SW-IO-6: a path that is a dotted suffix of another (`m.q` and `x.m.q`) keeps its own rank
    and scale through save_peft -> load_peft (pattern keys are anchored), and the resolution the
    saved config gives equals the oracle's PEFT rule applied to the written patterns."""
    rng = np.random.default_rng(3)

    def w(rank, scale):
        a = rng.normal(size=(4, rank)).astype(np.float32)
        b = rng.normal(size=(rank, 4)).astype(np.float32)
        return jaxlora.LoraWeights(jnp.asarray(a), jnp.asarray(b), jnp.asarray(scale))

    adapter = {"m.q": w(2, 3.0), "x.m.q": w(4, 1.0), "y.k": w(4, 1.0)}
    save_peft(tmp_path / "ad", adapter)
    loaded, config = load_peft_adapter(tmp_path / "ad")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for path, want in adapter.items():
        got = loaded[path]
        assert (got.rank, float(got.scale)) == (want.rank, float(want.scale)), path
        assert reference.resolve(raw["rank_pattern"], path, raw["r"]) == want.rank, path
        assert config.rank_for(path) == want.rank, path
        assert np.array_equal(np.asarray(got.a), np.asarray(want.a))


@pytest.mark.clause("SW-IO-6")
def test_modules_excluded_by_the_config_are_reported(tmp_path):
    """SW-IO-6: a module the config's `exclude_modules` removes (PEFT would not adapt it) but
    the weights file holds is loaded with a warning naming it, never silently."""
    one = jaxlora.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 4)), jnp.asarray(1.0))
    save_peft(tmp_path / "ad", {"m.q": one, "m.k": one})
    path = tmp_path / "ad" / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "target_modules": ["q", "k"], "exclude_modules": ["k"]}))
    with pytest.warns(UserWarning, match=r"modules 'm\.k' are not matched by target_modules"):
        loaded, _ = load_peft_adapter(tmp_path / "ad")
    assert set(loaded) == {"m.q", "m.k"}
