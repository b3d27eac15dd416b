"""The adapter bank: add, remove, immutability, pytree behaviour, stacking and history
independence (spec SW-BANK-1..3, SW-HISTORY-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases

import jaxlora

forward_jit = jax.jit(jaxlora.forward)


def leaves_bytes(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.clause("SW-BANK-1", "SW-BANK-3")
@given(case=cases(max_adapters=3, dtype_pairs=(("float32", "float32"),)))
def test_add_makes_available_without_activating(case):
    """SW-BANK-1, SW-BANK-3: `add` returns a new bank holding the adapter; the old bank is
    unchanged, nothing is activated (the base output is unchanged), and a duplicate name is an
    error that leaves the bank unchanged."""
    names = case.names
    bank = jaxlora.AdapterBank({n: case.adapters[n].adapter for n in names[:-1]})
    before = (bank.names, leaves_bytes(bank))
    bigger = bank.add(names[-1], case.adapters[names[-1]].adapter)
    assert bigger.names == names and bank.names == names[:-1]
    assert (bank.names, leaves_bytes(bank)) == before
    base = jaxlora.forward(case.model, case.x, jaxlora.select(bigger, None))
    assert np.array_equal(np.asarray(base), np.asarray(jaxlora.forward(case.model, case.x)))
    with pytest.raises(jaxlora.errors.AdapterExistsError, match=repr(names[0])):
        bigger.add(names[0], case.adapters[names[-1]].adapter)
    assert bigger.names == names
    y = jaxlora.forward(case.model, case.x, jaxlora.select(bigger, names[-1]))
    assert case.check(y, names[-1])[0]


@pytest.mark.clause("SW-BANK-2", "SW-BANK-3")
@given(data=st.data(), case=cases(max_adapters=4, dtype_pairs=(("float32", "float32"),)))
def test_remove_drops_the_adapter_from_the_active_set(data, case):
    """SW-BANK-2, SW-BANK-3: after `remove`, the name is gone, the old bank still holds it, and
    an active set that contained it continues with the remaining names in order: its output
    equals the oracle without the removed adapter."""
    active = data.draw(st.permutations(case.names), label="active")
    gone = data.draw(st.sampled_from(case.names), label="removed")
    smaller = case.bank.remove(gone)
    assert gone not in smaller and gone in case.bank
    assert smaller.names == tuple(n for n in case.names if n != gone)
    remaining = [n for n in active if n in smaller]  # the active set after the delete
    y = jaxlora.forward(case.model, case.x, jaxlora.select(smaller, remaining))
    ok, err, allowed = case.check(y, remaining)
    assert ok, (err, allowed)
    with pytest.raises(jaxlora.errors.AdapterNotFoundError, match=repr(gone)):
        jaxlora.select(smaller, active)


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


@pytest.mark.clause("SW-HISTORY-1")
@given(
    data=st.data(),
    case=cases(max_adapters=3, dtype_pairs=(("float32", "float32"), ("bfloat16", "float32"))),
)
def test_output_is_independent_of_switching_history(data, case):
    """SW-HISTORY-1: for a fixed active set and input, the jitted forward is bitwise identical
    whatever sequence of selections, forwards, merges and unmerges came before."""
    bank = jaxlora.conform(case.bank)
    target = data.draw(st.sampled_from([*case.names, None]), label="target")
    first = np.asarray(forward_jit(case.model, case.x, jaxlora.select(bank, target)))
    model = case.model
    steps = data.draw(
        st.lists(st.sampled_from([*case.names, None, "merge", "unmerge"]), max_size=8),
        label="history",
    )
    merged = None
    for step in steps:
        if step == "merge":
            merged = jaxlora.merge(model, bank)
        elif step == "unmerge":
            if merged is not None:
                jaxlora.unmerge(merged, bank)
        else:
            forward_jit(model, case.x, jaxlora.select(bank, step))
        again = np.asarray(forward_jit(model, case.x, jaxlora.select(bank, target)))
        assert again.tobytes() == first.tobytes()
    ok, err, allowed = case.check(jnp.asarray(first), target)
    assert ok, (err, allowed)
