"""Merging into every model form jaxlora runs (spec SW-MERGE-5..9, specs/merge.md).

Each merged model is run without adapters and compared, under SW-TOL-1, with the library's own
forward of the unmerged model with the adapter (`jaxlora.flax.nnx.apply`,
`jaxlora.flax.linen.apply`, `jaxlora.models.forward`); the original is checked bitwise.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora import reference
from jaxlora.flax import linen as jlinen
from jaxlora.flax import nnx as jnnx
from jaxlora.models import Llama, LlamaConfig
from jaxlora.models import forward as llama_forward
from jaxlora.types import LoraWeights

ALL = jaxlora.LoraConfig(r=2, lora_alpha=4.0, target_modules="all-linear", init_lora_weights=False)


def leaves_bytes(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


def adapter_for(shapes, seed=1, config=ALL):
    return jaxlora.init_adapter(jax.random.key(seed), config, shapes)


def assert_close(y, want, dtype="float32"):
    ok, err, allowed = reference.allclose(y, want, dtype)
    assert ok, (err, allowed)


def listed(message: str, before: str, after: str) -> list[str]:
    """The quoted names an error message lists between `before` and `after`."""
    match = re.search(re.escape(before) + r"(.*)" + re.escape(after), message)
    assert match, message
    return re.findall(r"'([^']*)'", match.group(1))


def weights(d_in, d_out, r=1, value=1.0, scale=1.0):
    return LoraWeights(
        jnp.full((d_in, r), value, jnp.float32), jnp.ones((r, d_out)), jnp.asarray(scale)
    )


class ListModel(nnx.Module):
    """Layers in a plain list attribute, in an `nnx.List` and in an `nnx.Sequential`."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.data([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
        self.blocks = nnx.List([nnx.Linear(8, 6, rngs=rngs)])
        self.head = nnx.Sequential(
            nnx.Linear(6, 5, rngs=rngs), jnp.tanh, nnx.Linear(5, 3, rngs=rngs)
        )

    def __call__(self, x):
        for layer in [*self.layers, *self.blocks]:
            x = jnp.tanh(layer(x))
        return self.head(x)


class Net(nn.Module):
    """Linen `DenseGeneral` with kernels (8, 2, 4) and (2, 4, 8), and a plain `Dense`."""

    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 4), name="up")(x)
        h = nn.DenseGeneral(8, axis=(-2, -1), name="down")(jnp.tanh(h))
        return nn.Dense(3, name="head")(h)


@pytest.mark.clause("SW-MERGE-5", "SW-MERGE-2", "SW-MERGE-3")
def test_nnx_layers_in_a_list_and_in_sequential():
    """SW-MERGE-5, SW-MERGE-2, SW-MERGE-3: an NNX model whose layers sit in a list, an `nnx.List`
    and an `nnx.Sequential` (integer keys, a function between layers) merges at the paths of
    `jaxlora.flax.nnx.layer_shapes`; the merged module (same class, its own variables) equals
    `apply(model, x, lora=adapter)`; the original is bitwise untouched; unmerge goes back."""
    model = ListModel(nnx.Rngs(0))
    shapes = jnnx.layer_shapes(model)
    assert list(shapes) == ["blocks.0", "head.layers.0", "head.layers.2", "layers.0", "layers.1"]
    assert sorted(jaxlora.kernel_paths(model)) == sorted(shapes)
    adapter = adapter_for(shapes)
    before = leaves_bytes(nnx.state(model))
    x = jax.random.normal(jax.random.key(2), (3, 4))
    merged = jaxlora.merge(model, adapter)
    assert type(merged) is ListModel and merged is not model
    assert leaves_bytes(nnx.state(model)) == before
    assert merged.layers[0].kernel is not model.layers[0].kernel
    assert merged.layers[0].bias is not model.layers[0].bias  # no variable is shared
    assert_close(merged(x), jnnx.apply(model, x, lora=adapter))
    assert not np.allclose(merged(x), model(x), atol=1e-3)  # the adapter does change the output
    restored = jaxlora.unmerge(merged, adapter)
    for path in shapes:
        want = jaxlora.get_kernel(model, path)
        assert_close(jaxlora.get_kernel(restored, path), want)


@pytest.mark.clause("SW-MERGE-5")
def test_nnx_sequential_of_the_issue_and_nnx_state():
    """SW-MERGE-5: `nnx.Sequential(Linear, relu, Linear)` merges at 'layers.0' (the path the
    old lookup refused), and merging its `nnx.State` directly gives the state of the merged
    module, bitwise."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 2, rngs=rngs))
    adapter = {"layers.0": weights(4, 8, value=0.5)}
    x = jax.random.normal(jax.random.key(2), (3, 4))
    merged = jaxlora.merge(model, adapter)
    assert_close(merged(x), jnnx.apply(model, x, lora=adapter))
    graphdef, state = nnx.split(model)
    merged_state = jaxlora.merge(state, adapter)
    assert type(merged_state) is type(state)
    assert leaves_bytes(merged_state) == leaves_bytes(nnx.state(merged))
    assert leaves_bytes(nnx.state(nnx.merge(graphdef, merged_state))) == leaves_bytes(
        nnx.state(merged)
    )


class ParamsAttr(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.params = nnx.Linear(2, 2, rngs=rngs)


@pytest.mark.clause("SW-MERGE-5")
def test_an_nnx_attribute_named_params_is_a_path():
    """SW-MERGE-5: only Linen variables are looked up inside their `params` collection: in an NNX
    module or its `nnx.State`, an attribute named `params` is an ordinary path part."""
    model = ParamsAttr(nnx.Rngs(0))
    assert jaxlora.kernel_paths(model) == ["params"]
    assert jaxlora.kernel_paths(nnx.state(model)) == ["params"]
    assert jaxlora.kernel_paths({"params": {"params": {"kernel": np.zeros((2, 2))}}}) == ["params"]


@pytest.mark.clause("SW-MERGE-6", "SW-MERGE-5")
def test_nnx_multi_head_attention():
    """SW-MERGE-6, SW-MERGE-5: NNX `MultiHeadAttention` (query/key/value kernels (8, 2, 4), out
    kernel (2, 4, 8)) merges the 2-D deltas reshaped to the kernels; the merged module equals
    the unmerged one with the adapter; the original is untouched."""
    model = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
    assert model.out.kernel.shape == (2, 4, 8) and model.query.kernel.shape == (8, 2, 4)
    shapes = jnnx.layer_shapes(model)
    adapter = adapter_for(shapes)
    before = leaves_bytes(nnx.state(model))
    x = jax.random.normal(jax.random.key(2), (2, 3, 8))
    merged = jaxlora.merge(model, adapter)
    assert leaves_bytes(nnx.state(model)) == before
    assert merged.out.kernel.shape == (2, 4, 8)
    assert_close(merged(x), jnnx.apply(model, x, lora=adapter))
    delta = np.asarray(adapter["out"].delta()).reshape(2, 4, 8)
    assert_close(merged.out.kernel[...], np.asarray(model.out.kernel[...]) + delta)


@pytest.mark.clause("SW-MERGE-6", "SW-MERGE-5", "SW-MERGE-3")
@pytest.mark.parametrize("form", ["variables", "params"])
def test_linen_dense_general(form):
    """SW-MERGE-6, SW-MERGE-5, SW-MERGE-3: Linen variables (paths inside the `params`
    collection) or the params alone, with DenseGeneral kernels (8, 2, 4) and (2, 4, 8) and a
    Dense, merge to a model equal to `jaxlora.flax.linen.apply(..., lora=adapter)`; the
    original is untouched; unmerge goes back under SW-TOL-1."""
    net, x = Net(), jax.random.normal(jax.random.key(3), (2, 8))
    variables = net.init(jax.random.key(0), x)
    shapes = jlinen.layer_shapes(net, x)
    assert shapes == {"up": (8, 8), "down": (8, 8), "head": (8, 3)}
    adapter = adapter_for(shapes)
    tree = variables if form == "variables" else variables["params"]
    assert sorted(jaxlora.kernel_paths(tree)) == sorted(shapes)
    before = leaves_bytes(tree)
    merged = jaxlora.merge(tree, adapter)
    assert leaves_bytes(tree) == before
    merged_vars = merged if form == "variables" else {"params": merged}
    assert_close(net.apply(merged_vars, x), jlinen.apply(net, variables, x, lora=adapter))
    back = jaxlora.unmerge(merged, adapter)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert_close(got, want)


@pytest.mark.clause("SW-MERGE-5", "SW-MERGE-2")
def test_llama_merges_by_lora_path_into_a_llama():
    """SW-MERGE-5, SW-MERGE-2: jaxlora's Llama merges at its projections' `lora_path` (HF
    module paths, not attribute paths) and gives a Llama whose logits equal
    `forward(model, tokens, lora=adapter)`; the original is bitwise untouched; the lookup
    accepts exactly the model's `lora_shapes()`."""
    model = Llama.random(LlamaConfig(64, 16, 32, 2, 4, 2, 4), seed=0)
    assert sorted(jaxlora.kernel_paths(model)) == sorted(model.lora_shapes())
    config = jaxlora.LoraConfig(
        r=2,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    adapter = adapter_for(model.lora_shapes(), config=config)
    before = leaves_bytes(nnx.state(model))
    tokens = jnp.asarray([[1, 5, 9, 2, 7]])
    merged = jaxlora.merge(model, adapter)
    assert type(merged) is Llama
    assert leaves_bytes(nnx.state(model)) == before
    want = llama_forward(model, tokens, lora=adapter)
    assert_close(llama_forward(merged, tokens), want)
    assert not np.allclose(want, llama_forward(model, tokens), atol=1e-3)
    with pytest.raises(jaxlora.errors.TargetNotFoundError) as err:
        jaxlora.merge(model, {"layers.0.q_proj": adapter["model.layers.0.self_attn.q_proj"]})
    assert sorted(listed(str(err.value), "Accepted paths: ", ". Was")) == sorted(
        model.lora_shapes()
    )


@pytest.mark.clause("SW-MERGE-5", "SW-ERROR-1")
def test_errors_list_exactly_the_accepted_paths():
    """SW-MERGE-5, SW-ERROR-1: a path the model lacks raises TargetNotFoundError listing exactly
    the paths the lookup accepts (each of which works), for merge and for get_kernel; nothing is
    changed."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 2, rngs=rngs))
    before = leaves_bytes(nnx.state(model))
    with pytest.raises(jaxlora.errors.TargetNotFoundError, match=r"'layers.1'") as err:
        jaxlora.merge(model, {"layers.1": weights(8, 8)})
    accepted = listed(str(err.value), "Accepted paths: ", ". Was")
    assert accepted == ["layers.0", "layers.2"]
    for path in accepted:
        jaxlora.get_kernel(model, path)
    with pytest.raises(jaxlora.errors.TargetNotFoundError) as err:
        jaxlora.get_kernel(model, "layers.1")
    assert listed(str(err.value), "Layers with a kernel: ", ".") == accepted
    assert leaves_bytes(nnx.state(model)) == before


@pytest.mark.clause("SW-MERGE-6", "SW-ERROR-1")
def test_general_kernel_shape_errors_name_the_accepted_splits():
    """SW-MERGE-6, SW-ERROR-1: an adapter whose (in, out) is no split of the kernel's shape
    raises ShapeMismatchError naming the kernel and the splits it accepts; a kernel that is not
    at least 2-D is named as such."""
    params = {
        "attn": {"out": {"kernel": np.zeros((2, 4, 8), np.float32)}},
        "s": {"kernel": np.zeros(3)},
    }
    with pytest.raises(jaxlora.errors.ShapeMismatchError) as err:
        jaxlora.merge(params, {"attn.out": weights(4, 16)})
    assert "the kernel is (2, 4, 8) [in..., out...], a layer (2, 32) or (8, 8)" in str(err.value)
    assert "adapter maps (4, 16)" in str(err.value) and "'attn.out'" in str(err.value)
    with pytest.raises(jaxlora.errors.ShapeMismatchError, match=r"\(3,\), not a linear layer"):
        jaxlora.merge(params, {"s": weights(3, 1)})
    merged = jaxlora.merge(params, {"attn.out": weights(2, 32, value=0.25)})
    assert_close(merged["attn"]["out"]["kernel"], np.full((2, 4, 8), 0.25))


@pytest.mark.clause("SW-MERGE-7", "SW-ERROR-1")
def test_key_map():
    """SW-MERGE-7, SW-ERROR-1: key_map maps adapter paths to the model's (merge and unmerge);
    a path missing after the map, a non-string result and two layers mapped to one path raise,
    naming the layers."""
    params = {"layers_0": {"q": {"kernel": np.eye(3, dtype=np.float32)}}}
    adapter = {"model.layers.0.self_attn.q_proj": weights(3, 3, value=0.5)}

    def hf_to_linen(path):
        return re.sub(r"model\.layers\.(\d+)\.self_attn\.q_proj", r"layers_\1.q", path)

    merged = jaxlora.merge(params, adapter, key_map=hf_to_linen)
    assert_close(merged["layers_0"]["q"]["kernel"], np.eye(3) + 0.5)
    back = jaxlora.unmerge(merged, adapter, key_map=hf_to_linen)
    assert_close(back["layers_0"]["q"]["kernel"], np.eye(3))
    with pytest.raises(jaxlora.errors.TargetNotFoundError, match=r"after key_map.*'q'"):
        jaxlora.merge(params, adapter, key_map=lambda p: "q")
    with pytest.raises(jaxlora.errors.ConfigError, match="returned None for layer"):
        jaxlora.merge(params, adapter, key_map=lambda p: None)
    two = {"a": weights(3, 3), "b": weights(3, 3)}
    with pytest.raises(jaxlora.errors.ConfigError, match="layers 'a' and 'b' to the same"):
        jaxlora.merge(params, two, key_map=lambda p: "layers_0.q")


@pytest.mark.clause("SW-MERGE-8", "SW-MERGE-4")
def test_safe_merge_under_jit_raises_a_jaxlora_error():
    """SW-MERGE-8, SW-MERGE-4: merge(safe=True) under jit raises ConfigError telling to call it
    outside jit or pass safe=False (not a tracer error); safe=False under jit equals the eager
    merge and unmerge."""
    params = {"q": {"kernel": jnp.eye(3)}}
    adapter = {"q": weights(3, 3, value=0.5, scale=2.0)}
    with pytest.raises(jaxlora.errors.ConfigError, match=r"outside jit.*safe=False"):
        jax.jit(lambda p, a: jaxlora.merge(p, a, safe=True))(params, adapter)
    merged = jax.jit(jaxlora.merge)(params, adapter)
    assert_close(merged["q"]["kernel"], jaxlora.merge(params, adapter)["q"]["kernel"])
    assert_close(merged["q"]["kernel"], np.eye(3) + 1.0)
    back = jax.jit(jaxlora.unmerge)(merged, adapter)
    assert_close(back["q"]["kernel"], jaxlora.unmerge(merged, adapter)["q"]["kernel"])


@pytest.mark.clause("SW-MERGE-9", "SW-ERROR-1")
def test_selections_and_gates():
    """SW-MERGE-9, SW-ERROR-1: a select(...) result merges its adapters in order; the base
    selection (gate off) keeps every kernel bitwise (-0.0 included), eagerly and with a traced
    gate under jit; a routed selection or a stacked bank is refused with ConfigError."""
    kernel = np.asarray([[-0.0, 1.0], [2.0, -0.0]], np.float32)
    params = {"q": {"kernel": kernel}}
    bank = jaxlora.AdapterBank({"a": {"q": weights(2, 2, value=0.5)}, "b": {"q": weights(2, 2)}})
    both = jaxlora.merge(params, jaxlora.select(bank, ["a", "b"]))
    assert_close(both["q"]["kernel"], kernel + 1.5)
    base = jaxlora.select(bank, None)
    for merged in (jaxlora.merge(params, base), jax.jit(jaxlora.merge)(params, base)):
        assert np.asarray(merged["q"]["kernel"]).tobytes() == kernel.tobytes()
    stacked = jaxlora.stack(jaxlora.conform(bank))
    for value in (stacked, stacked.route(["a"])):
        with pytest.raises(jaxlora.errors.ConfigError, match=r"bank\[name\]"):
            jaxlora.merge(params, value)


@dataclasses.dataclass(frozen=True)
class Holder:
    """A model that names its own layers (the KernelHolder protocol)."""

    kernels: dict

    def lora_kernels(self):
        return self.kernels

    def replace_kernels(self, kernels):
        return Holder({**self.kernels, **kernels})


@pytest.mark.clause("SW-MERGE-5", "SW-ERROR-1")
def test_kernel_holder_protocol_and_lookup_errors():
    """SW-MERGE-5, SW-ERROR-1: an object with lora_kernels()/replace_kernels() is merged through
    them; with_kernels refuses a kernel of another shape; a tree where two kernels get one path
    raises ConfigError naming it."""
    model = Holder({"enc": jnp.zeros((2, 3)), "dec": jnp.ones((3, 2))})
    merged = jaxlora.merge(model, {"enc": weights(2, 3, value=2.0)})
    assert isinstance(merged, Holder) and merged.kernels["dec"] is model.kernels["dec"]
    assert_close(merged.kernels["enc"], np.full((2, 3), 2.0))
    with pytest.raises(jaxlora.errors.ShapeMismatchError, match=r"'enc'.*\(3, 2\).*\(2, 3\)"):
        jaxlora.with_kernels(model, {"enc": jnp.zeros((3, 2))})
    clash = {"a.b": {"kernel": np.zeros((2, 2))}, "a": {"b": {"kernel": np.zeros((2, 2))}}}
    with pytest.raises(jaxlora.errors.ConfigError, match=r"path 'a.b'"):
        jaxlora.kernel_paths(clash)


class Tied(nnx.Module):
    """One `nnx.Linear` under two attribute paths."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(2, 2, rngs=rngs)
        self.b = self.a

    def __call__(self, x):
        return self.b(self.a(x))


class NotAPytree(nnx.Module, pytree=False):
    def __init__(self, rngs: nnx.Rngs):
        self.q = nnx.Linear(2, 2, rngs=rngs)


@pytest.mark.clause("SW-MERGE-5", "SW-ERROR-1")
def test_shared_layers_and_modules_that_are_not_pytrees():
    """SW-MERGE-5, SW-ERROR-1: a layer shared under two paths is not silently untied: merging
    one path raises ConfigError pointing to the NNX state, where the merge keeps the sharing
    (both uses of the layer see the merged kernel: the NumPy expectation below); an NNX module
    with pytree=False is not a pytree: ConfigError says to split it and merge the state."""
    model = Tied(nnx.Rngs(0))
    w = weights(2, 2, value=0.5)
    with pytest.raises(jaxlora.errors.ConfigError, match=r"'a' and 'b' share one kernel.*split"):
        jaxlora.merge(model, {"a": w})
    graphdef, state = nnx.split(model)
    assert jaxlora.kernel_paths(state) == ["a"]
    merged = nnx.merge(graphdef, jaxlora.merge(state, {"a": w}))
    assert merged.a is merged.b
    x = jax.random.normal(jax.random.key(2), (3, 2))
    kernel = np.asarray(model.a.kernel[...], np.float64) + np.asarray(w.delta())
    bias = np.asarray(model.a.bias[...], np.float64)
    assert_close(merged(x), ((np.asarray(x) @ kernel + bias) @ kernel + bias))  # both uses
    other = NotAPytree(nnx.Rngs(0))
    with pytest.raises(jaxlora.errors.ConfigError, match=r"NotAPytree is not a parameter.*split"):
        jaxlora.merge(other, {"q": w})
    graphdef, state = nnx.split(other)
    assert jaxlora.kernel_paths(jaxlora.merge(state, {"q": w})) == ["q"]
