"""jaxlora.flax.linen on an unmodified tiny Linen transformer vs the NumPy oracle (SW-FLAX-*)."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
from jaxlora.errors import ShapeMismatchError, TargetNotFoundError, UnsupportedFeatureError
from jaxlora.flax import linen as lora_linen

BLOCKS = ("block_0", "block_1")


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="query")(x)
        k = nn.DenseGeneral((HEADS, HEAD_DIM), name="key")(x)
        v = nn.Dense(HEADS * HEAD_DIM, name="value")(x).reshape(*x.shape[:-1], HEADS, HEAD_DIM)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(HEAD_DIM)
        o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attn")(x)
        return x + nn.Dense(DIM, name="down")(nn.relu(nn.Dense(HIDDEN, name="up")(x)))


class TinyLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        for name in BLOCKS:
            x = Block(name=name)(x)
        return nn.Dense(OUT, name="head")(x)


MODEL = TinyLinen()
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, DIM)), jnp.float32)
VARIABLES = MODEL.init(jax.random.key(0), X)
SHAPES = lora_linen.layer_shapes(MODEL, X)


def oracle_layers():
    layers = {}
    for path, (d_in, d_out) in SHAPES.items():
        node = VARIABLES["params"]
        for part in path.split("."):
            node = node[part]
        layers[path] = (
            np.asarray(node["kernel"], np.float64).reshape(d_in, d_out),
            np.asarray(node["bias"], np.float64).reshape(d_out),
        )
    return layers


@pytest.mark.clause("SW-FLAX-3", "SW-FLAX-2")
def test_layer_shapes_list_every_dense_layer_by_param_path():
    """SW-FLAX-3, SW-FLAX-2: layer_shapes gives each Dense/DenseGeneral's param-tree path and its
    2-D (prod(in), prod(out)), and init_adapter selects among them with PEFT's rules."""
    want = [f"{b}.{n}" for b in BLOCKS for n in LAYER_NAMES] + ["head"]
    assert sorted(SHAPES) == sorted(want)
    assert SHAPES["block_0.attn.query"] == (DIM, HEADS * HEAD_DIM)
    assert SHAPES["block_1.attn.out"] == (HEADS * HEAD_DIM, DIM)
    assert SHAPES["head"] == (DIM, OUT)
    for path, (d_in, d_out) in SHAPES.items():
        node = VARIABLES["params"]
        for part in path.split("."):
            node = node[part]
        assert np.prod(node["kernel"].shape) == d_in * d_out
    cfg = jaxlora.LoraConfig(r=2, target_modules=r".*\.attn\.(query|out)")
    adapter = jaxlora.init_adapter(jax.random.key(0), cfg, SHAPES)
    assert sorted(adapter) == sorted(reference.targets(cfg.target_modules, SHAPES))
    assert len(adapter) == 4


@pytest.mark.clause("SW-FLAX-1", "SW-FLAX-2", "SW-CONFORM-3")
def test_switching_sixteen_adapters_matches_oracle_with_one_trace():
    """SW-FLAX-1, SW-FLAX-2, SW-CONFORM-3: after conform, each of 16 adapters (ranks 1/2/4,
    different targets) and pairs of them match the float64 oracle; the jitted forward is traced
    once; with no adapter (`lora=None`, or `select(bank, None)` in the same trace) the output is
    bitwise the model's own."""
    chex.clear_trace_counter()
    bank = jaxlora.conform(sixteen_adapter_bank(SHAPES))
    layers = oracle_layers()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(variables, x, lora):
        return lora_linen.apply(MODEL, variables, x, lora=lora)

    pair = jax.jit(lambda v, x, sel: lora_linen.apply(MODEL, v, x, lora=sel))
    for active in [*bank.names, ("ad3", "ad4")]:
        chosen = jaxlora.select(bank, active)
        got = (fwd if isinstance(active, str) else pair)(VARIABLES, X, chosen)
        want = oracle_forward(np.asarray(X), oracle_dense(layers, chosen.adapters), BLOCKS)
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, f"{active}: {err} > {allowed}"
    assert fwd._cache_size() == 1
    own = jax.jit(MODEL.apply)(VARIABLES, X)
    base = jax.jit(lambda v, x: lora_linen.apply(MODEL, v, x, lora=None))(VARIABLES, X)
    assert np.array_equal(base, own)
    # select(bank, None): the bank's structure gated off, in the same trace, still bitwise
    assert np.array_equal(fwd(VARIABLES, X, jaxlora.select(bank, None)), own)
    assert fwd._cache_size() == 1


@pytest.mark.clause("SW-FLAX-4", "SW-MIXED-1")
@pytest.mark.parametrize("routing", ["gather", "onehot", "ragged"])
def test_mixed_batches_match_oracle_and_ids_do_not_retrace(routing):
    """SW-FLAX-4, SW-MIXED-1: with a stacked bank of 16 adapters, row i equals the oracle under
    its own adapter (or the base for -1) for every routing kernel; new ids reuse one trace."""
    chex.clear_trace_counter()
    bank = jaxlora.conform(sixteen_adapter_bank(SHAPES))
    stacked = jaxlora.stack(bank)
    layers = oracle_layers()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(variables, x, stacked, ids):
        return lora_linen.apply(
            MODEL, variables, x, lora=jaxlora.Routed(stacked, ids), routing=routing
        )

    for rows in (
        ["ad0", None, "ad7", "ad15"],
        [None] * 4,
        ["ad5"] * 4,
        ["ad9", "ad2", None, "ad4"],
    ):
        got = fwd(VARIABLES, X, stacked, jnp.asarray(stacked.ids(rows)))
        want = oracle_mixed(
            layers, np.asarray(X), [None if r is None else bank[r] for r in rows], BLOCKS
        )
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, f"{rows}: {err} > {allowed}"
    assert fwd._cache_size() == 1


@pytest.mark.clause("SW-FLAX-2")
def test_bad_targets_and_shapes_raise_clear_errors():
    """SW-FLAX-2: a path that is not a Dense of the model raises TargetNotFoundError listing the
    layers; wrong factor shapes raise ShapeMismatchError; a DenseGeneral with batch_dims is not
    listed and targeting it raises UnsupportedFeatureError."""
    w = jaxlora.LoraWeights(jnp.ones((DIM, 2)), jnp.ones((2, DIM)), jnp.asarray(1.0))
    with pytest.raises(TargetNotFoundError, match=r"'block_0\.attn\.nope'.*'block_0\.attn\.key'"):
        lora_linen.apply(MODEL, VARIABLES, X, lora={"block_0.attn.nope": w})
    bad = jaxlora.LoraWeights(jnp.ones((DIM + 1, 2)), jnp.ones((2, OUT)), jnp.asarray(1.0))
    with pytest.raises(ShapeMismatchError, match=r"'head'.*maps \(16, 8\).*a\(17, 2\)"):
        lora_linen.apply(MODEL, VARIABLES, X, lora={"head": bad})

    class Batched(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(4, axis=-1, batch_dims=(0,), name="bd")(x)

    xb = jnp.ones((2, 3))
    variables = Batched().init(jax.random.key(0), xb)
    assert lora_linen.layer_shapes(Batched(), xb) == {}
    assert lora_linen.dense_layers(Batched(), xb)["bd"].unsupported
    wb = jaxlora.LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 4)), jnp.asarray(1.0))
    with pytest.raises(UnsupportedFeatureError, match=r"'bd'.*batch_dims=\(0,\)"):
        lora_linen.apply(Batched(), variables, xb, lora={"bd": wb})
