"""Mixed-batch routing kernels against the NumPy oracle and each other (specs/routing.md §1)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora import NO_ADAPTER, LoraWeights, reference
from jaxlora.errors import ConfigError, ShapeMismatchError
from jaxlora.routing import ONEHOT_MAX_SLOTS, choose_routing, routed_delta

KERNELS = ("gather", "onehot", "ragged")
D_IN, D_OUT = 6, 5


def stacked_weights(seed: int, slots: int, rank: int) -> LoraWeights:
    rng = np.random.default_rng(seed)
    return LoraWeights(
        jnp.asarray(rng.normal(size=(slots, D_IN, rank)), jnp.float32),
        jnp.asarray(rng.normal(size=(slots, rank, D_OUT)), jnp.float32),
        jnp.asarray(rng.uniform(0.25, 2.0, size=slots), jnp.float32),
    )


def oracle_delta(x, stacked: LoraWeights, ids) -> np.ndarray:
    """Row by row through `reference.layer_forward` with a zero base layer (float64)."""
    x = np.asarray(x, np.float64)
    zero_w, zero_c = np.zeros((D_IN, D_OUT)), np.zeros(D_OUT)
    rows = []
    for i, slot in enumerate(np.asarray(ids)):
        terms = []
        if slot != NO_ADAPTER:
            a = np.asarray(stacked.a[slot], np.float64)
            b = np.asarray(stacked.b[slot], np.float64)
            terms = [(a, b, float(stacked.scale[slot]))]
        rows.append(reference.layer_forward(x[i], zero_w, zero_c, terms))
    return np.stack(rows)


@st.composite
def routing_cases(draw):
    slots = draw(st.sampled_from([1, 2, 5]))
    rank = draw(st.sampled_from([1, 2, 4]))
    batch = draw(st.sampled_from([1, 4, 6]))
    inner = draw(st.sampled_from([(), (3,)]))
    pattern = draw(st.sampled_from(["random", "all-same", "all-different", "all-base"]))
    if pattern == "all-same":
        ids = [draw(st.integers(0, slots - 1))] * batch
    elif pattern == "all-different":
        ids = [(i % (slots + 1)) - 1 for i in range(batch)]  # -1, 0, 1, ... cycling
    elif pattern == "all-base":
        ids = [NO_ADAPTER] * batch
    else:
        ids = draw(st.lists(st.integers(-1, slots - 1), min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**16))
    x = np.random.default_rng(seed + 1).normal(size=(batch, *inner, D_IN)).astype(np.float32)
    return stacked_weights(seed, slots, rank), jnp.asarray(x), jnp.asarray(ids, jnp.int32)


@pytest.mark.clause("SW-ROUTE-1", "SW-ROUTE-2")
@given(case=routing_cases())
def test_every_kernel_matches_the_oracle_and_the_others(case):
    """SW-ROUTE-1, SW-ROUTE-2: gather, onehot and ragged each equal the float64 oracle per row
    (random slot counts, ranks and id patterns incl. all-same, all-different, all-base), agree
    with each other, and give an exact zero on NO_ADAPTER rows."""
    stacked, x, ids = case
    want = oracle_delta(x, stacked, ids)
    outs = {m: np.asarray(routed_delta(x, stacked, ids, routing=m)) for m in KERNELS}
    base_rows = np.asarray(ids) == NO_ADAPTER
    for method, got in outs.items():
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, f"{method}: max error {err} > {allowed}"
        assert np.all(got[base_rows] == 0.0), method
        assert got.dtype == np.float32
    for method in ("onehot", "ragged"):
        ok, err, allowed = reference.allclose(outs[method], outs["gather"], "float32")
        assert ok, f"{method} vs gather: {err} > {allowed}"


@pytest.mark.clause("SW-ROUTE-1")
def test_sentinel_needs_no_slot_and_bf16_inputs_promote():
    """SW-ROUTE-1: with a single slot, -1 rows are zero and slot-0 rows equal the oracle; a
    bfloat16 x with float32 factors computes in float32 (promote(x, a))."""
    stacked = stacked_weights(3, 1, 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, D_IN)), jnp.bfloat16)
    ids = jnp.asarray([-1, 0, -1, 0], jnp.int32)
    want = oracle_delta(np.asarray(x, np.float32), stacked, ids)
    for method in KERNELS:
        got = routed_delta(x, stacked, ids, routing=method)
        assert got.dtype == jnp.float32
        ok, err, allowed = reference.allclose(got, want, "float32")
        assert ok, (method, err, allowed)


@pytest.mark.clause("SW-ROUTE-3")
def test_auto_rule_follows_static_shapes_and_never_retraces_on_ids():
    """SW-ROUTE-3: auto picks onehot for one-token rows with S <= 8, gather otherwise, and the
    jitted auto forward is traced once whatever the ids."""
    few, many = stacked_weights(0, 4, 2), stacked_weights(1, ONEHOT_MAX_SLOTS + 1, 2)
    assert choose_routing((8, D_IN), few) == "onehot"
    assert choose_routing((8, 1, D_IN), few) == "onehot"
    assert choose_routing((8, 3, D_IN), few) == "gather"
    assert choose_routing((8, D_IN), many) == "gather"

    @jax.jit
    @chex.assert_max_traces(n=1)
    def auto(x, st, ids):
        return routed_delta(x, st, ids, routing="auto")

    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, D_IN)), jnp.float32)
    for ids in ([0, 1, 2, 3, -1], [-1] * 5, [3] * 5, [2, 0, -1, 1, 1]):
        ids = jnp.asarray(ids, jnp.int32)
        ok, err, allowed = reference.allclose(
            auto(x, few, ids), oracle_delta(x, few, ids), "float32"
        )
        assert ok, (ids, err, allowed)
    assert auto._cache_size() == 1


def routed(weights: LoraWeights, ids) -> jaxlora.Routed:
    """A mixed-batch selection of the stacked `weights` at layer `"p"`."""
    names = tuple(f"s{i}" for i in range(weights.a.shape[0]))
    return jaxlora.Routed(jaxlora.StackedBank({"p": weights}, names), ids)


@pytest.mark.clause("SW-ROUTE-1")
def test_bad_arguments_raise_errors_naming_the_shapes():
    """SW-ROUTE-1: an unknown routing raises from `routed_delta`; through the seam
    (`jaxlora.lora_dense`, `jaxlora.forward` with a `Routed` selection) ids of the wrong length or
    dtype, x of the wrong width for the stacked weights and unstacked weights raise jaxlora errors
    that name the shapes and the fix."""
    stacked = stacked_weights(0, 3, 2)
    x = jnp.ones((4, D_IN))
    kernel = jnp.zeros((D_IN, D_OUT))
    with pytest.raises(ConfigError, match=r"unknown `routing` 'fast'.*gather"):
        routed_delta(x, stacked, jnp.zeros(4, jnp.int32), routing="fast")
    with pytest.raises(
        ShapeMismatchError,
        match=r"layer 'p' \(input x\(4, 6\)\): Routed ids have shape \(3,\) but the batch has 4 "
        r"rows.*one slot id per row",
    ):
        jaxlora.lora_dense(x, kernel, None, routed(stacked, jnp.zeros(3, jnp.int32)), "p")
    chain = jaxlora.DenseChain((kernel,), (jnp.zeros(D_OUT),), ("p",))
    for call in (
        lambda: jaxlora.forward(chain, x, lora=routed(stacked, jnp.zeros(4, jnp.float32))),
        lambda: jaxlora.lora_dense(
            x, kernel, None, routed(stacked, jnp.zeros(4, jnp.float32)), "p"
        ),
    ):
        with pytest.raises(ConfigError, match=r"Routed ids must be integers.*got float32.*route"):
            call()
    with pytest.raises(
        ShapeMismatchError,
        match=r"stacked bank, layer 'p': the layer maps \(7, 5\) \(in, out\) but the LoRA "
        r"weights are a\(3, 6, 2\) b\(3, 2, 5\), which map \(6, 5\)",
    ):
        wide = jnp.zeros((7, D_OUT))
        jaxlora.lora_dense(
            jnp.ones((4, 7)), wide, None, routed(stacked, jnp.zeros(4, jnp.int32)), "p"
        )
    flat = LoraWeights(stacked.a[0], stacked.b[0], stacked.scale[0])
    with pytest.raises(ShapeMismatchError, match=r"a \[S, in, r\].*got a\(6, 2\).*jaxlora\.stack"):
        flat_sel = jaxlora.Routed(
            jaxlora.StackedBank({"p": flat}, ("s0",)), jnp.zeros(4, jnp.int32)
        )
        jaxlora.lora_dense(x, kernel, None, flat_sel, "p")


@pytest.mark.clause("SW-ROUTE-4")
@pytest.mark.parametrize("method", [*KERNELS, "auto"])
def test_ids_outside_the_bank_never_fall_back(method):
    """SW-ROUTE-4: eager calls with ids outside [-1, S) raise naming them; under jit those rows
    are NaN for every method, while in-range rows (and -1 rows) keep their oracle values."""
    stacked = stacked_weights(0, 2, 2)
    x = np.random.default_rng(1).normal(size=(4, D_IN)).astype(np.float32)
    ids = np.asarray([2, -2, 1, -1], np.int32)
    with pytest.raises(ConfigError, match=r"must be in \[-1, 2\).*got \[-2, 2\]"):
        routed_delta(jnp.asarray(x), stacked, jnp.asarray(ids), routing=method)
    d = np.asarray(jax.jit(lambda x, i: routed_delta(x, stacked, i, routing=method))(x, ids))
    assert np.isnan(d[:2]).all()
    want = oracle_delta(x[2:], stacked, ids[2:])
    assert reference.allclose(d[2:], want, "float32")[0]
