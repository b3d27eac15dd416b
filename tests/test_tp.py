"""Tensor parallelism on 8 fake CPU devices (specs/families.md §2; conftest sets the flag).

A Qwen2 checkpoint (q/k/v biases: column-parallel biases are split too) with 8 heads and 4 KV
heads, so the k/v projections are split on model axes of 2 and 4 and replicated on 8.
"""

from __future__ import annotations

import collections
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import jaxlora
from jaxlora import reference
from jaxlora.errors import ConfigError, ShapeMismatchError
from jaxlora.generate import generate
from jaxlora.models import Llama, LlamaConfig, forward, load_llama, tp
from jaxlora.models import checkpoint as checkpoint_module
from jaxlora.models import llama as llama_module
from jaxlora.sharding import adapter_sharding, device_bytes, make_mesh, shard_batch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

P = PartitionSpec
CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
)
MESHES = [(1, 8), (2, 4), (4, 2)]
LAYOUTS = ("replicate-factors", "split-factors")
TOKENS = np.random.default_rng(0).integers(1, 128, (4, 8)).astype(np.int32)
MASK = np.ones((4, 8), bool)
MASK[1, :3] = MASK[3, :5] = False
ROWS = ["a", None, "b", "a"]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint dir, unsharded model, bank of two adapters of different ranks and targets)."""
    directory = tmp_path_factory.mktemp("qwen2-tp")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**CONFIG))
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("bias"):
                param.add_(0.2 * torch.randn_like(param))
    hf.save_pretrained(directory)
    model = load_llama(directory)
    bank = jaxlora.AdapterBank()
    for i, (name, r, targets) in enumerate([("a", 4, "all-linear"), ("b", 2, ["o_proj", "up"])]):
        cfg = jaxlora.LoraConfig(
            r=r, lora_alpha=2 * r + i, target_modules=targets, init_lora_weights=False
        )
        bank = bank.add(name, jaxlora.init_adapter(jax.random.key(i), cfg, model.lora_shapes()))
    # rank 8 (zero padded): a multiple of every model axis here, as lora_layout="split-factors"
    # needs (SW-TP-5)
    return directory, model, jaxlora.conform(bank, max_rank=8)


def assert_close(got, want):
    ok, err, bound = reference.allclose(np.asarray(got), np.asarray(want, np.float64), "float32")
    assert ok, f"max error {err:.3g} > SW-TOL-1 bound {bound:.3g}"


def spec_of(array) -> tuple:
    """The array's PartitionSpec with trailing Nones dropped (P(None, 'model') == that)."""
    spec = tuple(array.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


@pytest.mark.clause("SW-TP-1", "SW-TP-3")
def test_checkpoint_loads_into_the_megatron_layout(setup):
    """SW-TP-1, SW-TP-3: loaded straight into shards, q/k/v/gate/up (and their biases) are
    split by output, o/down by input with replicated biases, the embedding by vocabulary rows,
    norms replicated; k/v replicated when the 4 KV heads do not divide the model axis (8); the
    result equals shard_model of the unsharded model bitwise."""
    directory, model, _ = setup
    for data, m in [(2, 4), (1, 8)]:
        mesh = make_mesh(data=data, model=m)
        loaded = load_llama(directory, mesh=mesh)
        layer = loaded.layers[1]
        kv = ("model",) if m == 4 else ()  # split only when the 4 KV heads divide the axis
        assert spec_of(layer.q_proj.kernel[...]) == (None, "model")
        assert spec_of(layer.q_proj.bias[...]) == ("model",)
        assert spec_of(layer.k_proj.kernel[...]) == ((None, *kv) if kv else ())
        assert spec_of(layer.v_proj.bias[...]) == kv
        assert spec_of(layer.up_proj.kernel[...]) == (None, "model")
        assert spec_of(layer.o_proj.kernel[...]) == ("model",)
        assert spec_of(layer.down_proj.kernel[...]) == ("model",)
        assert spec_of(layer.input_layernorm.weight[...]) == ()
        assert spec_of(loaded.embed[...]) == ("model",)
        assert spec_of(loaded.lm_head[...]) == (None, "model")
        q = layer.q_proj.kernel[...]
        assert len(q.addressable_shards) == data * m
        assert {s.data.shape for s in q.addressable_shards} == {(64, 64 // m)}
        again = tp.shard_model(model, mesh)
        for (name, a), b in zip(loaded.tensors().items(), again.tensors().values(), strict=True):
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), name
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.clause("SW-TP-1", "SW-TP-5")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adapters_follow_their_layers(setup, layout):
    """SW-TP-1, SW-TP-5: column layers get B split by output, row layers A split by input, for
    a selected adapter and for a routed bank (ids over data); the other factor (column A, row
    B) is replicated with lora_layout="replicate-factors" and split by rank with
    "split-factors"."""
    _, model, bank = setup
    mesh = make_mesh(data=2, model=4)
    rank = ("model",) if layout == "split-factors" else ()
    active = tp.shard_lora(jaxlora.select(bank, "a"), model.config, mesh, lora_layout=layout)
    q, o = (
        active.adapters[0][f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert (spec_of(q.a), spec_of(q.b)) == ((None, *rank) if rank else (), (None, "model"))
    assert (spec_of(o.a), spec_of(o.b)) == (("model",), rank)
    routed = tp.shard_lora(jaxlora.stack(bank).route(ROWS), model.config, mesh, lora_layout=layout)
    up = routed.stacked.weights["model.layers.1.mlp.up_proj"]
    down = routed.stacked.weights["model.layers.1.mlp.down_proj"]
    assert (spec_of(up.a), spec_of(up.b)) == (
        (None, None, *rank) if rank else (),
        (None, None, "model"),
    )
    assert (spec_of(down.a), spec_of(down.b)) == ((None, "model"), (None, *rank) if rank else ())
    assert spec_of(routed.ids) == ("data",)


@pytest.mark.clause("SW-TP-1", "SW-TP-5")
@pytest.mark.parametrize(("data", "m"), MESHES)
def test_sharded_model_equals_unsharded(setup, data, m):
    """SW-TP-1, SW-TP-5: on (data, model) meshes of the 8 devices, the sharded model's logits
    (base, selected adapter, mixed batch) equal the unsharded model's within SW-TOL-1 with both
    LoRA layouts, and greedy generation with a mixed batch gives the same tokens."""
    _, model, bank = setup
    mesh = make_mesh(data=data, model=m)
    sharded = tp.shard_model(model, mesh)
    x, mask = shard_batch(TOKENS, mesh), shard_batch(MASK, mesh)
    stacked = jaxlora.stack(bank)
    got = forward(sharded, x, attention_mask=mask)
    assert got.sharding.mesh.shape == mesh.shape
    assert_close(got, forward(model, TOKENS, attention_mask=MASK))
    for lora in (jaxlora.select(bank, "b"), stacked.route(ROWS)):
        want = forward(model, TOKENS, attention_mask=MASK, lora=lora)
        for layout in LAYOUTS:
            placed = tp.shard_lora(lora, model.config, mesh, lora_layout=layout)
            assert_close(forward(sharded, x, attention_mask=mask, lora=placed), want)
    want = generate(model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=5)
    for layout in LAYOUTS:
        lora = tp.shard_lora(stacked.route(ROWS), model.config, mesh, lora_layout=layout)
        got = generate(sharded, PROMPTS, lora=lora, max_new_tokens=5)
        assert got.rows() == want.rows(), layout


@pytest.mark.clause("SW-TP-1")
def test_data_slot_and_model_axes_together(setup):
    """SW-TP-1 (with SW-SHARD-2): a (data 2, slot 2, model 2) mesh, the bank split over slots
    and over the model axis: the mixed batch equals the unsharded one."""
    _, model, bank = setup
    mesh = make_mesh(data=2, slot=2, model=2)
    stacked = jaxlora.stack(bank)
    lora = tp.shard_lora(stacked.route(ROWS), model.config, mesh, mode="slot")
    b = lora.stacked.weights["model.layers.0.self_attn.v_proj"].b
    assert spec_of(b) == ("slot", None, "model")
    got = forward(tp.shard_model(model, mesh), shard_batch(TOKENS, mesh), lora=lora)
    assert_close(got, forward(model, TOKENS, lora=stacked.route(ROWS)))


def _expected_bytes(tree, specs, mesh) -> int:
    """Bytes per device the layout implies: each array's bytes over its split factor."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), specs, strict=True):
        split = math.prod(mesh.shape[a] for a in spec if a is not None)
        total += leaf.nbytes // split
    return total


@pytest.mark.clause("SW-TP-2")
@pytest.mark.parametrize(("data", "m"), MESHES)
def test_bytes_per_device(setup, data, m):
    """SW-TP-2: every device holds exactly the weight bytes the layout implies; when every
    projection splits (m = 2, 4) the weights per device are 1/m of the total plus the
    replicated norms."""
    _, model, _ = setup
    mesh = make_mesh(data=data, model=m)
    sharded = tp.shard_model(model, mesh)
    weights = sharded.tensors()
    per_device = device_bytes(weights)
    assert len(per_device) == 8
    specs = tp.tensor_specs(model.config, m)
    expected = _expected_bytes(list(weights.values()), [specs[n] for n in weights], mesh)
    assert set(per_device.values()) == {expected}
    total = sum(v.nbytes for v in model.tensors().values())
    norms = sum(v.nbytes for n, v in model.tensors().items() if n.endswith("norm.weight"))
    if m in (2, 4):
        assert expected == (total - norms) // m + norms
    else:  # k/v replicated: more than 1/m, less than 1/m plus the k/v kernels and biases
        kv = sum(v.nbytes for n, v in model.tensors().items() if re.search(r"[kv]_proj\.", n))
        assert (total - norms) // m + norms < expected < (total - norms) // m + norms + kv


@pytest.mark.clause("SW-TP-2", "SW-TP-5")
@pytest.mark.parametrize(("data", "m"), MESHES)
def test_bank_bytes_per_device(setup, data, m):
    """SW-TP-2, SW-TP-5: every device holds exactly the bank bytes the layout implies: with
    lora_layout="split-factors" 1/m of the factors of every split layer, with
    "replicate-factors" the column A and row B whole and 1/m of the others, so (1 + 1/m) / 2 of
    a layer whose A and B are the same size (q, o); unsplit layers (k/v when the 4 KV heads do
    not divide m = 8) and the scales are replicated."""
    _, model, bank = setup
    mesh = make_mesh(data=data, model=m)
    splits = tp.layer_splits(model.config, m)
    stacked = jaxlora.stack(bank)
    weights = stacked.weights
    factors = sum(w.a.nbytes + w.b.nbytes for w in weights.values())
    scales = sum(w.scale.nbytes for w in weights.values())
    unsplit = sum(w.a.nbytes + w.b.nbytes for p, w in weights.items() if splits[p] is None)
    one_factor = sum(
        (w.a if splits[p] == "column" else w.b).nbytes for p, w in weights.items() if splits[p]
    )
    for layout in LAYOUTS:
        routed = tp.shard_lora(stacked.route(ROWS), model.config, mesh, lora_layout=layout)
        per_device = device_bytes(routed.stacked)
        assert len(per_device) == 8
        leaves, specs = [], []
        for path, w in routed.stacked.weights.items():
            specs_w = jaxlora.sharding.lora_specs(splits[path], stacked=True, layout=layout)
            leaves += [w.a, w.b, w.scale]
            specs += [specs_w.a, specs_w.b, specs_w.scale]
        assert set(per_device.values()) == {_expected_bytes(leaves, specs, mesh)}, layout
        whole = unsplit + (one_factor if layout == "replicate-factors" else 0)
        assert max(per_device.values()) == whole + (factors - whole) // m + scales, layout
        square = {
            p: w for p, w in routed.stacked.weights.items() if w.in_features == w.out_features
        }
        assert {splits[p] for p in square} == {"column", "row"}  # q and o
        square_bytes = max(device_bytes(square).values()) - sum(
            w.scale.nbytes for w in square.values()
        )
        square_total = sum(w.a.nbytes + w.b.nbytes for w in square.values())
        if layout == "replicate-factors":  # (1 + 1/m) / 2 of them
            assert square_bytes * 2 * m == square_total * (m + 1)
        else:
            assert square_bytes * m == square_total


C = collections.Counter
KINDS = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"


def _collectives(model, tokens, lora, routing="auto") -> collections.Counter:
    """(kind, result shape without layouts) -> count, in the compiled forward's HLO."""
    graphdef, state = nnx.split(model)
    mask = jnp.ones(tokens.shape, bool)
    lora = llama_module.check_lora(model, lora, tokens.shape[0])
    lowered = llama_module._forward_jit.lower(graphdef, state, tokens, mask, lora, routing)
    found = collections.Counter()
    for shape, kind in re.findall(rf"= (.+?) ({KINDS})(?:-start)?\(", lowered.compile().as_text()):
        found[kind, re.sub(r"\{[^}]*\}|/\*[^*]*\*/", "", shape)] += 1
    return found


def _kinds(found: collections.Counter) -> collections.Counter:
    out = collections.Counter()
    for (kind, _), n in found.items():
        out[kind] += n
    return out


@pytest.mark.clause("SW-TP-2", "SW-TP-5")
def test_collectives_per_lora_layout(setup):
    """SW-TP-2, SW-TP-5: with lora_layout="replicate-factors" the compiled forward with a
    selected adapter or a mixed batch has exactly the base forward's collectives, a row-parallel
    layer's x @ A partial sums [.., r] reduced by the same all-reduce as its output [.., hidden]
    (the onehot kernel's finiteness check adds one all-reduce of [S] booleans); with
    "split-factors" it has those plus one all-gather of x @ A [.., r] per adapted
    column-parallel layer and one all-reduce of the delta [.., hidden] per adapted row-parallel
    layer, nothing else."""
    _, model, bank = setup
    mesh = make_mesh(data=2, model=4)
    sharded = tp.shard_model(model, mesh)
    x = shard_batch(TOKENS, mesh)
    rows = TOKENS.shape[0] // 2  # per data shard
    hidden, rank = model.config.hidden_size, 8
    base = _collectives(sharded, x, None)
    out = f"f32[{rows},8,{hidden}]"
    assert base == {("all-reduce", out): 2 * model.config.num_hidden_layers + 1}
    splits = tp.layer_splits(model.config, 4)
    together = ("all-reduce", f"({out}, f32[{rows},8,{rank}])")
    for lora in (jaxlora.select(bank, "a"), jaxlora.stack(bank).route(ROWS)):
        targets = lora.paths() if isinstance(lora, jaxlora.Routed) else set(lora.adapters[0])
        column = sum(splits[p] == "column" for p in targets)
        row = sum(splits[p] == "row" for p in targets)
        assert column == 10 and row == 4  # every projection of both layers, k/v split at m=4
        replicated = _collectives(
            sharded, x, tp.shard_lora(lora, model.config, mesh, lora_layout="replicate-factors")
        )
        # the base's collectives, each row layer's all-reduce now a tuple with x @ A
        assert replicated == base - C({("all-reduce", out): row}) + C({together: row})
        split = _collectives(
            sharded, x, tp.shard_lora(lora, model.config, mesh, lora_layout="split-factors")
        )
        added = {("all-gather", f"f32[{rows},8,{rank}]"): column, ("all-reduce", out): row}
        assert split == replicated + C(added)
    routed = tp.shard_lora(jaxlora.stack(bank).route(ROWS), model.config, mesh)
    onehot = _collectives(sharded, x, routed, routing="onehot")
    flags = {key: n for key, n in onehot.items() if "pred" in key[1]}
    assert list(flags.values()) == [1]  # SW-NUM-3's per-slot finite flags, all layers in one
    (shape,) = [s for _, s in flags]
    assert set(re.findall(r"(\w+)\[", shape)) == {"pred"}
    assert _kinds(onehot) == _kinds(base) + C({"all-reduce": 1})


class _RecordingSlice:
    """A safetensors slice that records which parts are read."""

    def __init__(self, value: np.ndarray, reads: list):
        self.value, self.reads = value, reads

    def get_shape(self):
        return list(self.value.shape)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.value[index]


@pytest.mark.clause("SW-TP-3")
def test_loading_reads_only_each_devices_slice(setup, monkeypatch):
    """SW-TP-3: the sharded loader never reads a whole tensor (no get_tensor) and reads a
    column-parallel weight [out, in] in slices of out / m rows, one per device."""
    directory, model, _ = setup
    reads: dict[str, list] = collections.defaultdict(list)
    real_open = checkpoint_module.safe_open

    class Spy:
        def __init__(self, *args):
            self.inner = real_open(*args)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            raise AssertionError(f"{name} read whole")

        def get_slice(self, name):
            return _RecordingSlice(self.f.get_tensor(name), reads[name])

    monkeypatch.setattr(checkpoint_module, "safe_open", Spy)
    mesh = make_mesh(data=1, model=8)
    loaded = load_llama(directory, mesh=mesh)
    q = reads["model.layers.0.self_attn.q_proj.weight"]
    assert len(q) == 8 and {(r[0].stop - r[0].start) for r in q} == {64 // 8}
    down = reads["model.layers.0.mlp.down_proj.weight"]  # [hidden, intermediate]: by columns
    assert {(r[1].stop - r[1].start) for r in down} == {128 // 8}
    want = model.layers[0].q_proj.kernel[...]
    np.testing.assert_array_equal(np.asarray(loaded.layers[0].q_proj.kernel[...]), want)


@pytest.mark.clause("SW-TP-1")
def test_sizes_that_do_not_split_raise_with_the_fix():
    """SW-TP-1: heads or intermediate sizes that are not a multiple of the model axis, and LoRA
    factors that cannot be split, raise naming the size and the fix; so do bad mesh sizes."""
    mesh = make_mesh(data=2, model=4)
    odd = Llama.random(LlamaConfig(64, 24, 32, 1, 6, 2, 4))
    with pytest.raises(ConfigError, match=r"num_attention_heads=6 is not a multiple of the model"):
        tp.shard_model(odd, mesh)
    with pytest.raises(ConfigError, match=r"intermediate_size=30 .*divides 30"):
        tp.layer_splits(LlamaConfig(64, 16, 30, 1, 4, 4, 4), 4)
    w = jaxlora.LoraWeights(jnp.ones((6, 2)), jnp.ones((2, 8)), jnp.asarray(1.0))
    with pytest.raises(ShapeMismatchError, match=r"'l0' is row-parallel .* 6 input features"):
        adapter_sharding({"l0": w}, mesh, {"l0": "row"})
    with pytest.raises(ConfigError, match=r"`model` must be a positive device count, got 0"):
        make_mesh(model=0)
    with pytest.raises(ConfigError, match=r"data=2 x slot=1 x model=8 devices needs 16"):
        make_mesh(data=2, model=8)
    no_model_axis = adapter_sharding({"l0": w}, make_mesh(data=8), {"l0": "row"})
    assert no_model_axis["l0"].a.spec == P()  # nothing to split over: replicated


@pytest.mark.clause("SW-TP-5")
def test_ranks_that_do_not_split_raise_with_the_fix():
    """SW-TP-5: lora_layout="split-factors" refuses a rank that is not a multiple of the model
    axis with a ConfigError naming the adapter, the layer, the rank, the axis size and the fix
    (conform to a multiple, or the other layout), which accepts it; an unknown layout raises."""
    config = LlamaConfig(64, 16, 32, 1, 4, 4, 4)
    mesh = make_mesh(data=2, model=4)
    path = "model.layers.0.self_attn.q_proj"
    stacked = jaxlora.StackedBank(
        {path: jaxlora.LoraWeights(jnp.ones((2, 16, 6)), jnp.ones((2, 6, 16)), jnp.ones(2))},
        ("x", "y"),
    )
    routed = stacked.route(["x", "y"])
    with pytest.raises(
        ConfigError,
        match=r"stacked bank of adapters \('x', 'y'\), layer 'model.layers.0.self_attn.q_proj': "
        r"rank 6 is not a multiple of mesh axis 'model' of size 4.*max_rank=8.*replicate-factors",
    ):
        tp.shard_lora(routed, config, mesh, lora_layout="split-factors")
    placed = tp.shard_lora(routed, config, mesh, lora_layout="replicate-factors")
    assert spec_of(placed.stacked.weights[path].a) == ()
    adapter = {path: jaxlora.LoraWeights(jnp.ones((16, 2)), jnp.ones((2, 16)), jnp.asarray(1.0))}
    with pytest.raises(ConfigError, match=r"active adapter #0, layer .* rank 2 .* size 4"):
        tp.shard_lora(adapter, config, mesh, lora_layout="split-factors")
    with pytest.raises(ConfigError, match=r"unknown lora_layout 'split'"):
        tp.shard_lora(adapter, config, mesh, lora_layout="split")  # pyright: ignore
