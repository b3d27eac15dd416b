"""The forward of jaxlora against the NumPy oracle: scaling, targets, the layer and chain
forward, dtypes, active sets, conforming and mixed batches (spec sections 2-4, 5, 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import cases

import jaxlora

forward_jit = jax.jit(jaxlora.forward)


def plain_base(model: jaxlora.DenseChain, x: jax.Array) -> jax.Array:
    """The model with no adapter machinery at all (SW-MODEL-1 written out)."""
    h = x
    for i, (kernel, bias) in enumerate(zip(model.kernels, model.biases, strict=True)):
        h = h @ kernel + bias
        if i < len(model.kernels) - 1:
            h = jnp.tanh(h)
    return h


plain_jit = jax.jit(plain_base)


@pytest.mark.clause("SW-MODEL-1", "SW-ACTIVE-2")
@given(case=cases(max_adapters=2), none=st.sampled_from([None, [], ()]))
def test_no_active_adapter_is_bitwise_the_base_model(case, none):
    """SW-ACTIVE-2, SW-MODEL-1: with no active adapter the output is bit-identical to the model
    without adapter machinery (eager and jitted), and equals the oracle's base chain."""
    active = jaxlora.select(jaxlora.conform(case.bank), none)
    eager = jaxlora.forward(case.model, case.x, active)
    assert np.array_equal(np.asarray(eager), np.asarray(plain_base(case.model, case.x)))
    jitted = forward_jit(case.model, case.x, active)
    assert np.array_equal(np.asarray(jitted), np.asarray(plain_jit(case.model, case.x)))
    ok, err, allowed = case.check(eager, None)
    assert ok, (err, allowed)


@pytest.mark.clause("SW-DTYPE-1")
def test_bf16_base_with_fp32_adapter_accumulates_in_fp32_and_casts_once():
    """SW-DTYPE-1: bf16 base, fp32 adapter: the delta is computed and added in float32 and the sum
    is rounded to bfloat16 once. With base output 1 and delta d = 2^-8 + 2^-17, rounding d to
    bf16 first would give bf16(1 + 2^-8) = 1 (ties to even); the rule gives bf16(1 + d) > 1."""
    d = np.float32(2.0**-8 + 2.0**-17)
    assert np.float32(ml_dtypes.bfloat16(d)) != d  # d itself is not a bfloat16 value
    want = ml_dtypes.bfloat16(np.float32(1.0) + d)  # the rule, in NumPy
    wrong = ml_dtypes.bfloat16(np.float32(1.0) + np.float32(ml_dtypes.bfloat16(d)))
    assert want != wrong
    kernel = jnp.ones((1, 1), jnp.bfloat16)
    w = jaxlora.LoraWeights(jnp.full((1, 1), d, jnp.float32), jnp.ones((1, 1)), jnp.asarray(1.0))
    x = jnp.ones((1, 1), jnp.bfloat16)
    for fn in (jaxlora.lora_dense, jax.jit(jaxlora.lora_dense, static_argnums=4)):
        y = fn(x, kernel, None, {"p": w}, "p")
        assert y.dtype == jnp.bfloat16
        assert np.asarray(y)[0, 0] == want
    # two fp32 deltas are summed in fp32 before the single cast: d/2 + d/2 == d
    half = jaxlora.LoraWeights(w.a, w.b, jnp.asarray(0.5))
    y2 = jaxlora.lora_dense(x, kernel, None, jaxlora.Active.of({"p": half}, {"p": half}), "p")
    assert np.asarray(y2)[0, 0] == want
