"""Weighted combination of adapters: cat, linear, svd (spec SW-COMBINE-1..4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases

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


@pytest.mark.clause("SW-COMBINE-1")
@given(data=st.data(), case=cases(max_adapters=2))
def test_cat_is_exact(data, case):
    """SW-COMBINE-1: `cat` has scale 1, rank = sum of the ranks at each layer, `A B` equal to
    `sum_i w_i s_i A_i B_i`, and a forward equal to the oracle's `combine_cat`."""
    names, weights = draw_inputs(data, case)
    combined = jaxlora.combine(case.bank, names, weights, "cat")
    ref = reference.combine_cat([case.adapters[n].ref for n in names], weights)
    assert list(combined) == list(ref.weights)
    for path, w in combined.items():
        ranks = [case.adapters[n].adapter[path].rank for n in names if path in case.bank[n]]
        assert w.rank == sum(ranks) and float(w.scale) == 1.0
        want = exact_sum(case, names, weights, path)
        ok, err, allowed = reference.allclose(
            np.asarray(w.delta(), np.float32), want, case.adapter_dtype
        )
        assert ok, (path, err, allowed)
    y = forward_with(case, combined)
    expected = reference.chain_forward(case.layers, case.x64, [ref])
    ok, err, allowed = reference.allclose(y.astype(jnp.float32), expected, looser(case))
    assert ok, (err, allowed)


@pytest.mark.clause("SW-COMBINE-2")
@given(data=st.data(), case=cases(max_adapters=3, same_rank=True))
def test_linear_matches_the_oracle(data, case):
    """SW-COMBINE-2: `linear` (equal ranks) builds PEFT's `A = sum sign(c) sqrt|c| A_i`,
    `B = sum sqrt|c| B_i` with scale 1: factors and forward equal the oracle's."""
    names, weights = draw_inputs(data, case)
    combined = jaxlora.combine(case.bank, names, weights, "linear")
    ref = reference.combine_linear([case.adapters[n].ref for n in names], weights)
    assert list(combined) == list(ref.weights)
    for path, w in combined.items():
        assert w.a.dtype == jnp.dtype(case.adapter_dtype) == w.b.dtype
        for got, want in ((w.a, ref.weights[path][0]), (w.b, ref.weights[path][1])):
            ok, err, allowed = reference.allclose(got.astype(jnp.float32), want, got.dtype)
            assert ok, (path, err, allowed)
    y = forward_with(case, combined)
    expected = reference.chain_forward(case.layers, case.x64, [ref])
    assert reference.allclose(y.astype(jnp.float32), expected, looser(case))[0]


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


@pytest.mark.clause("SW-COMBINE-3")
@given(data=st.data(), case=cases(max_adapters=3), k=st.sampled_from([None, 1, 2, 5]))
def test_svd_is_the_best_rank_k_approximation(data, case, k):
    """SW-COMBINE-3: `svd` returns scale-1 factors of rank k (default: the largest input rank
    at the layer) whose product's error from the exact sum D is the Eckart-Young optimum
    `sqrt(sum_{j>k} sigma_j(D)^2)`, computed from D's float64 singular values."""
    names, weights = draw_inputs(data, case)
    combined = jaxlora.combine(case.bank, names, weights, "svd", svd_rank=k)
    for path, w in combined.items():
        d = exact_sum(case, names, weights, path)
        ranks = [case.adapters[n].adapter[path].rank for n in names if path in case.bank[n]]
        want_k = min(k if k is not None else max(ranks), *d.shape)
        assert w.rank == want_k and float(w.scale) == 1.0
        sigma = np.linalg.svd(d, compute_uv=False)
        optimum = float(np.sqrt(np.sum(sigma[want_k:] ** 2)))
        got = float(np.linalg.norm(d - np.asarray(w.delta(), np.float64)))
        allowed = reference.tolerance(case.adapter_dtype) * (1 + float(np.linalg.norm(d)))
        assert abs(got - optimum) <= allowed, (path, got, optimum, allowed)


@pytest.mark.clause("SW-COMBINE-4", "SW-COMBINE-1")
@given(data=st.data(), case=cases(max_adapters=2))
def test_two_active_equal_cat_with_unit_weights(data, case):
    """SW-COMBINE-4, SW-COMBINE-1: activating `[n1, n2]` gives the output of the single `cat`
    combination of `n1, n2` with weights `[1, 1]`, under SW-TOL-1 (and both match the
    oracle)."""
    names = data.draw(
        st.lists(st.sampled_from(case.names), min_size=1, max_size=2, unique=True), label="n"
    )
    both = jaxlora.forward(case.model, case.x, jaxlora.select(case.bank, names))
    cat = forward_with(case, jaxlora.combine(case.bank, names, [1.0] * len(names), "cat"))
    ok, err, allowed = reference.allclose(
        cat.astype(jnp.float32), np.asarray(both.astype(jnp.float32), np.float64), looser(case)
    )
    assert ok, (err, allowed)
    assert case.check(both, names)[0]
