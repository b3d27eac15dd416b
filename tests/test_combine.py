"""Weighted combination of adapters: cat, linear, svd (spec SW-COMBINE-1..4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

import jaxlora
from jaxlora import reference

WEIGHTS = st.sampled_from([-1.0, -0.5, 0.5, 1.0, 2.0])


def draw_inputs(data, case, min_size=1):
    names = data.draw(
        st.lists(st.sampled_from(case.names), min_size=min_size, max_size=3, unique=True),
        label="names",
    )
    weights = data.draw(st.lists(WEIGHTS, min_size=len(names), max_size=len(names)), label="w")
    return names, weights


def looser(case) -> str:
    """SW-TOL-1: an output computed from a combined adapter stored in the adapter dtype is
    compared under the less precise of the output and adapter dtypes."""
    return max(case.base_dtype, case.adapter_dtype, key=reference.tolerance)


def forward_with(case, adapter) -> jnp.ndarray:
    bank = case.bank.add("combined", adapter)
    return jaxlora.forward(case.model, case.x, jaxlora.select(bank, "combined"))


def exact_sum(case, names, weights, path) -> np.ndarray:
    """`sum_i w_i s_i A_i B_i` at `path` from the oracle's float64 copies."""
    total = 0.0
    for name, w in zip(names, weights, strict=True):
        t = case.adapters[name].ref.terms(path)
        if t is not None:
            total = total + w * t[2] * (t[0] @ t[1])
    return total


@pytest.mark.clause("SW-COMBINE-2", "SW-ERROR-1")
def test_linear_refuses_unequal_ranks():
    """SW-COMBINE-2, SW-ERROR-1: `linear` over unequal ranks raises ConfigError naming the layer
    and each adapter's rank; the bank is unchanged."""
    mk = lambda r: jaxlora.make_adapter(  # noqa: E731
        jaxlora.LoraConfig(r=r), {"l0": (np.ones((3, r)), np.ones((r, 2)))}
    )
    bank = jaxlora.AdapterBank({"two": mk(2), "three": mk(3)})
    with pytest.raises(jaxlora.errors.ConfigError, match=r"'l0'.*'two': 2, 'three': 3"):
        jaxlora.combine(bank, ["two", "three"], [1.0, 1.0], "linear")
    assert bank.names == ("two", "three")
