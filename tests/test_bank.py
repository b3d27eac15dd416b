"""The adapter bank: add, remove, immutability, pytree behaviour, stacking and history
independence (spec SW-BANK-1..3, SW-HISTORY-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

forward_jit = jax.jit(jaxlora.forward)


def leaves_bytes(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.clause("SW-BANK-3")
def test_bank_is_an_immutable_pytree():
    """SW-BANK-3: the bank is a pytree (tree_map and jit keep names and order); `__getitem__`
    returns a copy, so editing it does not reach the bank; `replace` returns a new bank."""
    w = jaxlora.LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 3)), jnp.asarray(2.0))
    bank = jaxlora.AdapterBank({"b": {"l0": w}, "a": {"l0": w}})
    doubled = jax.tree.map(lambda v: v * 2, bank)
    assert isinstance(doubled, jaxlora.AdapterBank) and doubled.names == ("b", "a")
    assert float(doubled["a"]["l0"].scale) == 4.0 and float(bank["a"]["l0"].scale) == 2.0
    through_jit = jax.jit(lambda b: b)(bank)
    assert through_jit.names == ("b", "a")
    copy = bank["a"]
    copy["l1"] = w
    assert list(bank["a"]) == ["l0"]
    replaced = bank.replace("a", {"l0": jaxlora.LoraWeights(w.a, w.b, jnp.asarray(5.0))})
    assert float(replaced["a"]["l0"].scale) == 5.0 and float(bank["a"]["l0"].scale) == 2.0
    assert "b" in bank and len(bank) == 2 and "AdapterBank" in repr(bank)


@pytest.mark.clause("SW-MIXED-1", "SW-BANK-3")
def test_stack_puts_each_adapter_in_its_slot():
    """SW-MIXED-1, SW-BANK-3: `stack` builds slot-major arrays in the requested order, ids map
    names to slots and None to NO_ADAPTER; the bank is unchanged."""
    rng = np.random.default_rng(0)
    bank = jaxlora.AdapterBank()
    for name, scale in (("x", 1.0), ("y", 2.0), ("z", 3.0)):
        w = jaxlora.LoraWeights(
            jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
            jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
            jnp.asarray(scale),
        )
        bank = bank.add(name, {"l0": w})
    before = leaves_bytes(bank)
    st_ = jaxlora.stack(bank, ["z", "x"])
    assert st_.names == ("z", "x")
    assert st_.weights["l0"].a.shape == (2, 4, 2) and st_.weights["l0"].scale.tolist() == [3, 1]
    assert np.array_equal(np.asarray(st_.weights["l0"].b[1]), np.asarray(bank["x"]["l0"].b))
    assert st_.ids(["x", None, "z"]).tolist() == [1, jaxlora.NO_ADAPTER, 0]
    assert leaves_bytes(bank) == before
