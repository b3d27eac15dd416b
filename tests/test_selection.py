"""The selection values themselves: gates (SW-ACTIVE-4), reprs, and NNX state (SW-FLAX-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.flax import nnx as lora_nnx

PATHS = ["blocks.0.q", "blocks.0.o"]


def _bank(n: int = 3) -> tuple[jaxlora.DenseChain, jaxlora.AdapterBank]:
    model = jaxlora.DenseChain.init(jax.random.key(0), PATHS, [8, 8, 4])
    bank = jaxlora.AdapterBank()
    for i in range(n):
        cfg = jaxlora.LoraConfig(r=i + 1, target_modules=["q"], init_lora_weights=False)
        bank = bank.add(f"a{i}", jaxlora.init_adapter(jax.random.key(i), cfg, model.layer_shapes()))
    return model, jaxlora.conform(bank)


@pytest.mark.clause("SW-ACTIVE-4", "SW-ACTIVE-2")
def test_base_selection_has_the_adapters_structure():
    """SW-ACTIVE-4: `select(bank, None)` on a conformed bank has the treedef, shapes and dtypes
    of `select(bank, name)` (so the base model, SW-ACTIVE-2, shares its compilation); on an
    empty bank it selects nothing."""
    _, bank = _bank()
    base, one = jaxlora.select(bank, None), jaxlora.select(bank, "a1")
    assert jax.tree.structure(base) == jax.tree.structure(one)
    shapes = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]  # noqa: E731
    assert shapes(base) == shapes(one)
    assert base.gate.tolist() == [False] and one.gate.tolist() == [True]
    assert jaxlora.select(bank, []).gate.tolist() == [False]
    assert jaxlora.select(jaxlora.AdapterBank(), None).adapters == ()


@pytest.mark.clause("SW-ACTIVE-4")
def test_gated_off_adapter_is_a_select_not_an_added_zero():
    """SW-ACTIVE-4: a gated-off adapter leaves the output bit-identical even when its delta is
    NaN/Inf (an implementation that multiplies by a zero gate gives NaN), with the gate traced
    so gate on and off share one compilation."""
    model, _ = _bank(1)
    x = jax.random.normal(jax.random.key(5), (4, 8))
    bad = {
        "blocks.0.q": jaxlora.LoraWeights(
            jnp.full((8, 2), jnp.inf), jnp.full((2, 8), jnp.nan), jnp.asarray(1.0)
        )
    }
    traces = []

    def f(m, x, lora):
        traces.append(1)
        return jaxlora.forward(m, x, lora=lora)

    fwd = jax.jit(f)
    off = fwd(model, x, jaxlora.Active.of(bad, gate=[False]))
    assert np.array_equal(np.asarray(off), np.asarray(jaxlora.forward(model, x)))
    on = fwd(model, x, jaxlora.Active.of(bad, gate=[True]))
    assert not np.all(np.isfinite(np.asarray(on)))
    assert len(traces) == 1


@pytest.mark.clause("SW-ACTIVE-4", "SW-FORWARD-1")
def test_gates_pick_which_of_several_adapters_apply():
    """SW-ACTIVE-4, SW-FORWARD-1: with several adapters, each gate switches its own delta:
    gates (on, off, on) equal selecting the first and third adapter, bitwise (same
    arithmetic, same order)."""
    model, bank = _bank(3)
    x = jax.random.normal(jax.random.key(6), (2, 8))
    fwd = jax.jit(jaxlora.forward)
    adapters = [bank[n] for n in ("a0", "a1", "a2")]
    gated = fwd(model, x, jaxlora.Active.of(*adapters, gate=[True, False, True]))
    two = jax.jit(jaxlora.forward)(model, x, jaxlora.select(bank, ["a0", "a2"]))
    assert np.array_equal(np.asarray(gated), np.asarray(two))


def test_reprs_are_compact():
    """Reprs of selections and stacked banks summarise instead of dumping arrays (an issue 12
    finding: 233 lines for a 3-layer toy)."""
    _model, bank = _bank(3)
    stacked = jaxlora.stack(bank)
    assert repr(stacked) == "StackedBank(slots=('a0', 'a1', 'a2'), layers=1, rank=3)"
    routed = stacked.route(["a2", None])
    assert repr(routed) == f"Routed({stacked!r}, ids=[2, -1])"
    assert repr(jaxlora.select(bank, "a0")) == "Active(adapters=1, layers=[1], gate=[True])"
    assert "\n" not in repr(stacked) + repr(routed)


class _WithState(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.norm(self.dense(x)))


@pytest.mark.clause("SW-FLAX-5")
@pytest.mark.parametrize("gate", [True, False])
def test_nnx_apply_updates_state_as_a_plain_call(gate):
    """SW-FLAX-5: `nnx.apply` writes BatchNorm statistics and RNG counters back exactly as
    `model(x)` does (the plain model carrying the merged kernel when the adapter is on),
    leaves the model's modules in place, and keeps LoRA out of its state."""
    with_lora, plain = _WithState(nnx.Rngs(0, dropout=1)), _WithState(nnx.Rngs(0, dropout=1))
    w = jaxlora.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 4)), jnp.asarray(0.5))
    if gate:
        plain.dense.kernel[...] = plain.dense.kernel[...] + w.delta()
    x = jnp.arange(8.0).reshape(2, 4)
    dense_before, keys_before = with_lora.dense, _state_paths(with_lora)
    lora_nnx.apply(with_lora, x, lora=jaxlora.Active.of({"dense": w}, gate=[gate]))
    plain(x)
    assert with_lora.dense is dense_before and type(with_lora.dense) is nnx.Linear
    assert _state_paths(with_lora) == keys_before  # no LoRA in the state
    np.testing.assert_allclose(with_lora.norm.mean[...], plain.norm.mean[...], rtol=1e-6)
    np.testing.assert_allclose(with_lora.norm.var[...], plain.norm.var[...], rtol=1e-6)
    assert int(with_lora.drop.rngs.count[...]) == int(plain.drop.rngs.count[...]) == 1
    assert not np.array_equal(np.asarray(with_lora.norm.mean[...]), np.zeros(4))


def _state_paths(model: nnx.Module) -> set[tuple]:
    return {path for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
