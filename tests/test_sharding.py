"""Sharded mixed batches on 8 fake CPU devices (specs/routing.md §2; conftest sets the flag)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference
from jaxlora.errors import ConfigError, ShapeMismatchError
from jaxlora.sharding import (
    bank_sharding,
    batch_sharding,
    make_mesh,
    shard_bank,
    shard_batch,
)
from jaxlora.slots import replace_slot

PATHS = ("blocks.0.q", "blocks.0.v", "head")
MODEL = jaxlora.DenseChain.init(jax.random.key(0), PATHS, [8, 16, 16, 4])
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)
ROWS = ["a", "b", None, "c", "d", "a", None, "b"]


def make_stacked():
    shapes = MODEL.layer_shapes()
    bank = jaxlora.AdapterBank()
    for i, (name, r) in enumerate(zip("abcd", (1, 2, 4, 2), strict=True)):
        cfg = jaxlora.LoraConfig(
            r=r, lora_alpha=2.0 + i, target_modules=["q", "head"], init_lora_weights=False
        )
        bank = bank.add(name, jaxlora.init_adapter(jax.random.key(i), cfg, shapes))
    return jaxlora.stack(jaxlora.conform(bank))


def mixed(model, x, stacked, ids):
    return jaxlora.forward(model, x, lora=jaxlora.Routed(stacked, ids), routing="gather")


@pytest.mark.clause("SW-SHARD-1", "SW-SHARD-2", "SW-SHARD-3")
@pytest.mark.parametrize("mode", ["replicated", "slot"])
def test_sharded_forward_equals_unsharded_and_keeps_shardings(mode):
    """SW-SHARD-1, SW-SHARD-2, SW-SHARD-3: on a 4x2 (data x slot) mesh of fake CPU devices the
    sharded forward equals the unsharded one within tolerance; the output keeps the requested
    row sharding, the compiled function's bank inputs the requested bank sharding, and a slot
    replacement keeps the bank's sharding."""
    assert jax.device_count() == 8
    mesh = make_mesh(data=4, slot=2)
    stacked = make_stacked()
    ids = jnp.asarray(stacked.ids(ROWS))
    want = np.asarray(jax.jit(mixed)(MODEL, X, stacked, ids))

    placed = shard_bank(stacked, mesh, mode)
    xs, ids_s = shard_batch(X, mesh), shard_batch(ids, mesh)
    out_sharding = batch_sharding(mesh, 2)
    fwd = jax.jit(mixed, out_shardings=out_sharding)
    got = fwd(MODEL, xs, placed, ids_s)
    compiled_count = fwd._cache_size()  # jit objects of one function may share a cache
    ok, err, allowed = reference.allclose(got, want, "float32")
    assert ok, (err, allowed)
    assert got.sharding.is_equivalent_to(out_sharding, 2)
    assert xs.sharding.spec[0] == "data" and ids_s.sharding.spec[0] == "data"

    expected = bank_sharding(stacked, mesh, mode)
    for leaf, sharding in zip(jax.tree.leaves(placed), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    compiled = fwd.lower(MODEL, xs, placed, ids_s).compile()
    bank_in = jax.tree.leaves(compiled.input_shardings[0][2])
    for got_s, leaf, want_s in zip(
        bank_in, jax.tree.leaves(placed), jax.tree.leaves(expected), strict=True
    ):
        assert got_s.is_equivalent_to(want_s, leaf.ndim)

    swapped = replace_slot(placed, "c", _one(), donate=True)
    for leaf, sharding in zip(jax.tree.leaves(swapped), jax.tree.leaves(expected), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    fwd(MODEL, xs, swapped, ids_s)
    assert fwd._cache_size() == compiled_count


def _one():
    cfg = jaxlora.LoraConfig(r=1, target_modules=["head"], init_lora_weights=False)
    return jaxlora.init_adapter(jax.random.key(7), cfg, MODEL.layer_shapes())


@pytest.mark.clause("SW-SHARD-1", "SW-SHARD-2")
def test_uneven_sizes_and_bad_meshes_raise_with_the_fix():
    """SW-SHARD-1, SW-SHARD-2: rows or slots that do not divide the mesh axis, an unknown mode,
    a missing axis and a mesh larger than the device count raise errors that say what to do."""
    mesh = make_mesh(data=4, slot=2)
    with pytest.raises(ShapeMismatchError, match=r"6 rows.*'data' of size 4.*pad the batch"):
        shard_batch(jnp.ones((6, 8)), mesh)
    stacked = jaxlora.stack(
        jaxlora.conform(jaxlora.AdapterBank({"a": _one(), "b": _one(), "c": _one()}))
    )
    with pytest.raises(ShapeMismatchError, match=r"3 slots.*'slot' of size 2.*replicated"):
        shard_bank(stacked, mesh, "slot")
    with pytest.raises(ConfigError, match="unknown bank sharding mode 'rows'"):
        shard_bank(stacked, mesh, "rows")
    with pytest.raises(ConfigError, match=r"no axis 'model'"):
        batch_sharding(mesh, 2, axis="model")
    with pytest.raises(ConfigError, match=r"16 devices; 8 are available"):
        make_mesh(data=8, slot=2)
