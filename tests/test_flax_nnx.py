"""jaxlora.flax.nnx on an unmodified tiny NNX transformer vs the NumPy oracle (SW-FLAX-*)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_flax_common import (
    DIM,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    LAYER_NAMES,
    OUT,
    oracle_dense,
    oracle_forward,
    oracle_mixed,
    sixteen_adapter_bank,
)

import jaxlora
from jaxlora import reference
from jaxlora.errors import (
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
    UnsupportedFeatureError,
)
from jaxlora.flax import nnx as lora_nnx

BLOCKS = ("blocks.0", "blocks.1")


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LinearGeneral(DIM, (HEADS, HEAD_DIM), rngs=rngs)
        self.key = nnx.LinearGeneral(DIM, (HEADS, HEAD_DIM), rngs=rngs)
        self.value = nnx.Linear(DIM, HEADS * HEAD_DIM, rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, HEAD_DIM), DIM, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        q, k = self.query(x), self.key(x)
        v = self.value(x).reshape(*x.shape[:-1], HEADS, HEAD_DIM)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HEAD_DIM)
        return self.out(jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attn = Attention(rngs)
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.down = nnx.Linear(HIDDEN, DIM, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.down(nnx.relu(self.up(x)))


class TinyNNX(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(rngs) for _ in BLOCKS])
        self.head = nnx.Linear(DIM, OUT, rngs=rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _random_biases(model: nnx.Module) -> nnx.Module:
    """Non-zero biases, so that a wrong bias path would show (NNX initialises them to zero)."""
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear | nnx.LinearGeneral):
            module.bias[...] = jnp.asarray(rng.normal(size=module.bias.shape), jnp.float32)
    return model


MODEL = _random_biases(TinyNNX(nnx.Rngs(0)))
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, DIM)), jnp.float32)
SHAPES = lora_nnx.layer_shapes(MODEL)
GRAPHDEF, STATE = nnx.split(MODEL)


def oracle_layers():
    modules = {".".join(map(str, p)): m for p, m in nnx.iter_modules(MODEL)}
    return {
        path: (
            np.asarray(modules[path].kernel[...], np.float64).reshape(d_in, d_out),
            np.asarray(modules[path].bias[...], np.float64).reshape(d_out),
        )
        for path, (d_in, d_out) in SHAPES.items()
    }


@pytest.mark.clause("SW-FLAX-3", "SW-FLAX-2")
def test_layer_shapes_list_every_linear_by_attribute_path():
    """SW-FLAX-3, SW-FLAX-2: layer_shapes gives every Linear/LinearGeneral's dotted attribute
    path and its 2-D shape; target_modules names and regexes select among them."""
    want = [f"{b}.{n}" for b in BLOCKS for n in LAYER_NAMES] + ["head"]
    assert sorted(SHAPES) == sorted(want)
    assert SHAPES["blocks.1.attn.key"] == (DIM, HEADS * HEAD_DIM)
    assert SHAPES["blocks.0.attn.out"] == (HEADS * HEAD_DIM, DIM)
    cfg = jaxlora.LoraConfig(r=2, target_modules=["up", "head"])
    adapter = jaxlora.init_adapter(jax.random.key(0), cfg, SHAPES)
    assert sorted(adapter) == sorted(reference.targets(["up", "head"], SHAPES))
    assert len(adapter) == 3


@pytest.mark.clause("SW-FLAX-1", "SW-FLAX-2", "SW-CONFORM-3")
def test_switching_sixteen_adapters_matches_oracle_with_one_trace():
    """SW-FLAX-1, SW-FLAX-2, SW-CONFORM-3: after conform, each of 16 adapters matches the float64
    oracle through one jitted forward (one trace); the caller's model is not modified; no
    adapter (`lora=None`, or `select(bank, None)` in the same trace) gives bitwise the model's
    own output."""
    chex.clear_trace_counter()
    bank = jaxlora.conform(sixteen_adapter_bank(SHAPES))
    layers = oracle_layers()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(state, x, lora):
        return lora_nnx.apply(nnx.merge(GRAPHDEF, state), x, lora=lora)

    for name in bank.names:
        chosen = jaxlora.select(bank, name)
        want = oracle_forward(np.asarray(X), oracle_dense(layers, chosen.adapters), BLOCKS)
        ok, err, allowed = reference.allclose(fwd(STATE, X, chosen), want, "float32")
        assert ok, f"{name}: {err} > {allowed}"
    assert fwd._cache_size() == 1
    assert type(MODEL.blocks[0].attn.query) is nnx.LinearGeneral  # untouched
    own = jax.jit(lambda s, x: nnx.merge(GRAPHDEF, s)(x))(STATE, X)
    base = jax.jit(lambda s, x: lora_nnx.apply(nnx.merge(GRAPHDEF, s), x))(STATE, X)
    assert np.array_equal(base, own)
    # select(bank, None): the bank's structure gated off, in the same trace, still bitwise
    assert np.array_equal(fwd(STATE, X, jaxlora.select(bank, None)), own)
    assert fwd._cache_size() == 1


@pytest.mark.clause("SW-FLAX-4", "SW-MIXED-1")
@pytest.mark.parametrize("routing", ["auto", "ragged"])
def test_mixed_batches_match_oracle_and_ids_do_not_retrace(routing):
    """SW-FLAX-4, SW-MIXED-1: under nnx.jit, row i of a mixed batch equals the oracle under its
    own adapter (or the base for -1); changing ids does not retrace."""
    chex.clear_trace_counter()
    bank = jaxlora.conform(sixteen_adapter_bank(SHAPES))
    stacked = jaxlora.stack(bank)
    layers = oracle_layers()

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def fwd(model, x, stacked, ids):
        return lora_nnx.apply(model, x, lora=jaxlora.Routed(stacked, ids), routing=routing)

    for rows in (
        ["ad1", None, "ad8", "ad14"],
        [None] * 4,
        ["ad3"] * 4,
        ["ad11", "ad6", "ad0", None],
    ):
        got = fwd(MODEL, X, stacked, jnp.asarray(stacked.ids(rows)))
        want = oracle_mixed(
            layers, np.asarray(X), [None if r is None else bank[r] for r in rows], BLOCKS
        )
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, f"{rows}: {err} > {allowed}"


@pytest.mark.clause("SW-FLAX-2")
def test_bad_targets_and_shapes_raise_clear_errors():
    """SW-FLAX-2: unknown paths raise TargetNotFoundError listing the layers, wrong factor shapes
    ShapeMismatchError, a LinearGeneral contracting a non-trailing axis UnsupportedFeatureError,
    and half a mixed-batch request ConfigError."""
    w = jaxlora.LoraWeights(jnp.ones((DIM, 2)), jnp.ones((2, DIM)), jnp.asarray(1.0))
    with pytest.raises(TargetNotFoundError, match=r"'blocks\.0\.mlp'.*'blocks\.0\.up'"):
        lora_nnx.apply(MODEL, X, lora={"blocks.0.mlp": w})
    with pytest.raises(ShapeMismatchError, match=r"'head'.*maps \(16, 8\).*b\(2, 16\)"):
        lora_nnx.apply(MODEL, X, lora={"head": w})
    stacked = jaxlora.stack(jaxlora.conform(sixteen_adapter_bank(SHAPES)))
    with pytest.raises(
        ConfigError,
        match=r"stacked\.route\(names\) for a mixed batch.*got "
        r"StackedBank",
    ):
        lora_nnx.with_lora(MODEL, stacked)  # half a mixed-batch request: no per-row ids

    leading = nnx.LinearGeneral(3, 4, axis=0, rngs=nnx.Rngs(0))
    wl = jaxlora.LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 4)), jnp.asarray(1.0))
    with pytest.raises(UnsupportedFeatureError, match=r"''.*axis=\(0,\)"):
        lora_nnx.apply(leading, jnp.ones((3, 5)), lora={"": wl})


def _host(leaf) -> np.ndarray:
    """A state leaf as NumPy (RNG keys as their key data)."""
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


class Stateful(nnx.Module):
    """A model whose call writes state: BatchNorm statistics and the dropout RNG counter."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(DIM, HIDDEN, rngs=rngs)
        self.norm = nnx.BatchNorm(HIDDEN, use_running_average=False, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, OUT, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(self.norm(self.up(x))))


@pytest.mark.clause("SW-FLAX-5")
def test_apply_writes_the_calls_state_updates_back_to_the_model():
    """SW-FLAX-5: `apply` with any selection (none, one adapter, a mixed batch) leaves the model's
    BatchNorm statistics and RNG counters exactly as a plain `model(x)` does, keeps its modules
    (same objects, same types) and adds nothing of the LoRA selection to its state."""
    x = X.reshape(-1, DIM)
    shapes = lora_nnx.layer_shapes(Stateful(nnx.Rngs(0)))
    cfg = jaxlora.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False)
    bank = jaxlora.AdapterBank().add("a", jaxlora.init_adapter(jax.random.key(3), cfg, shapes))
    rows = ["a", None] * (x.shape[0] // 2)
    selections = {
        "none": None,
        "adapter": jaxlora.select(bank, "a"),
        "mixed": jaxlora.stack(bank).route(rows),
    }
    for label, lora in selections.items():
        plain, model = Stateful(nnx.Rngs(0)), Stateful(nnx.Rngs(0))
        before = nnx.state(model)
        modules = [(p, m, type(m)) for p, m in nnx.iter_modules(model)]
        for _ in range(2):  # the second call must start from the first call's updates
            want = plain(x)
            got = lora_nnx.apply(model, x, lora=lora)
        after, expected = nnx.state(model), nnx.state(plain)
        assert jax.tree.structure(after) == jax.tree.structure(before), label
        assert jax.tree.structure(after) == jax.tree.structure(expected), label
        for leaf, exp in zip(jax.tree.leaves(after), jax.tree.leaves(expected), strict=True):
            assert np.array_equal(_host(leaf), _host(exp)), label
        stats = model.norm.mean[...]
        assert not np.array_equal(stats, np.zeros_like(stats)), label  # the state did change
        assert [(p, m, type(m)) for p, m in nnx.iter_modules(model)] == modules, label
        assert type(model.head) is nnx.Linear, label
        if lora is None:
            assert np.array_equal(got, want)
        else:  # the adapter is applied (dropout masks agree: same RNG counters as the plain call)
            assert not np.allclose(got, want), label
