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
    adapter gives bitwise the model's own output."""
    chex.clear_trace_counter()
    bank = jaxlora.conform(sixteen_adapter_bank(SHAPES))
    layers = oracle_layers()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(state, x, active):
        return lora_nnx.apply(nnx.merge(GRAPHDEF, state), x, active=active)

    for name in bank.names:
        chosen = jaxlora.select(bank, name)
        want = oracle_forward(np.asarray(X), oracle_dense(layers, chosen), BLOCKS)
        ok, err, allowed = reference.allclose(fwd(STATE, X, chosen), want, "float32")
        assert ok, f"{name}: {err} > {allowed}"
    assert fwd._cache_size() == 1
    assert type(MODEL.blocks[0].attn.query) is nnx.LinearGeneral  # untouched
    base = jax.jit(lambda s, x: lora_nnx.apply(nnx.merge(GRAPHDEF, s), x))(STATE, X)
    assert np.array_equal(base, jax.jit(lambda s, x: nnx.merge(GRAPHDEF, s)(x))(STATE, X))


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
        return lora_nnx.apply_mixed(model, x, stacked=stacked, ids=ids, routing=routing)

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
        lora_nnx.apply(MODEL, X, active=({"blocks.0.mlp": w},))
    with pytest.raises(ShapeMismatchError, match=r"'head'.*\(16, 8\).*b\(2, 16\)"):
        lora_nnx.apply(MODEL, X, active=({"head": w},))
    with pytest.raises(ConfigError, match="needs both `stacked`"):
        lora_nnx.with_lora(MODEL, ids=jnp.zeros(4, jnp.int32))

    leading = nnx.LinearGeneral(3, 4, axis=0, rngs=nnx.Rngs(0))
    wl = jaxlora.LoraWeights(jnp.ones((3, 1)), jnp.ones((1, 4)), jnp.asarray(1.0))
    with pytest.raises(UnsupportedFeatureError, match=r"''.*axis=\(0,\)"):
        lora_nnx.apply(leading, jnp.ones((3, 5)), active=({"": wl},))
