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
from strategies import active_sets, cases, configs

import jaxlora
from jaxlora import reference

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


@pytest.mark.clause("SW-SCALE-1", "SW-SCALE-2", "SW-SCALE-3")
@given(kwargs=configs(), path=st.sampled_from(["blocks.0.q", "blocks.1.v", "head", "x.0.v"]))
def test_scale_and_rank_resolution_match_the_oracle(kwargs, path):
    """SW-SCALE-1, SW-SCALE-2, SW-SCALE-3: jaxlora's r, alpha and scale of a layer equal the
    oracle's (alpha / r or alpha / sqrt(r), patterns resolved by PEFT's first-match rule)."""
    cfg = jaxlora.LoraConfig(**kwargs)
    ref = reference.RefAdapter(
        weights={},
        **{k: kwargs[k] for k in ("r", "lora_alpha")},
        use_rslora=kwargs["use_rslora"],
        rank_pattern=kwargs["rank_pattern"],
        alpha_pattern=kwargs["alpha_pattern"],
    )
    assert cfg.rank_for(path) == ref.rank_at(path)
    assert cfg.scale_for(path) == pytest.approx(ref.scale_at(path), rel=1e-12)


@pytest.mark.clause("SW-TARGET-1")
@given(kwargs=configs(), layout=st.sampled_from(range(2)))
def test_target_selection_matches_the_oracle(kwargs, layout):
    """SW-TARGET-1: `match_targets` selects the same layers as the oracle, in model order."""
    from strategies import LAYOUTS

    paths = LAYOUTS[layout]
    got = jaxlora.match_targets(kwargs["target_modules"], paths, kwargs["exclude_modules"])
    assert got == reference.targets(kwargs["target_modules"], paths, kwargs["exclude_modules"])


@pytest.mark.clause("SW-FORWARD-1", "SW-ACTIVE-1", "SW-DTYPE-1", "SW-TOL-1")
@given(data=st.data(), case=cases())
def test_forward_matches_the_oracle(data, case):
    """SW-FORWARD-1, SW-ACTIVE-1, SW-DTYPE-1: the chain forward with one, several (ordered) or no
    active adapters equals the float64 oracle under SW-TOL-1, in float32 and bfloat16 base dtypes
    (with float32 or bfloat16 adapters)."""
    active = data.draw(active_sets(case.names), label="active")
    y = jaxlora.forward(case.model, case.x, jaxlora.select(case.bank, active))
    ok, err, allowed = case.check(y, active)
    assert ok, f"max error {err} > {allowed} ({case.base_dtype}/{case.adapter_dtype}, {active})"


@pytest.mark.clause("SW-FORWARD-1", "SW-CONFORM-1", "SW-CONFORM-2")
@given(data=st.data(), case=cases(), extra=st.sampled_from([0, 5]))
def test_conformed_forward_matches_the_oracle_of_the_original(data, case, extra):
    """SW-FORWARD-1, SW-CONFORM-1, SW-CONFORM-2: zero rank padding (also above the largest
    rank) and zero adapters for the union of targets change no output: the jitted forward over
    the conformed bank equals the oracle of the original adapters."""
    largest = max(w.rank for ad in case.bank.values() for w in ad.values())
    bank = jaxlora.conform(case.bank, max_rank=largest + extra)
    assert {w.rank for ad in bank.values() for w in ad.values()} == {largest + extra}
    assert len({frozenset(ad) for ad in bank.values()}) == 1
    active = data.draw(active_sets(case.names), label="active")
    y = forward_jit(case.model, case.x, jaxlora.select(bank, active))
    ok, err, allowed = case.check(y, active)
    assert ok, f"max error {err} > {allowed} for {active}"


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


@pytest.mark.clause("SW-FORWARD-2")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_untargeted_layers_compute_exactly_the_base(dtype):
    """SW-FORWARD-2: layers no active adapter targets compute `x W + c` exactly: the forward with
    an adapter on the last layer only equals, bitwise, the base prefix followed by the adapted
    last layer."""
    rng = np.random.default_rng(0)
    widths = [8, 16, 8, 4]
    layers = {
        p: (rng.normal(size=(widths[i], widths[i + 1])), rng.normal(size=widths[i + 1]))
        for i, p in enumerate(["blocks.0.q", "blocks.0.v", "head"])
    }
    model = jaxlora.DenseChain.from_layers(layers, dtype=dtype)
    cfg = jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["head"])
    ad = jaxlora.make_adapter(
        cfg, {"head": (rng.normal(size=(8, 4)), rng.normal(size=(4, 4)))}, dtype=dtype
    )
    x = jnp.asarray(rng.normal(size=(5, 8)), dtype)
    h = x
    for kernel, bias in zip(model.kernels[:2], model.biases[:2], strict=True):
        h = jnp.tanh(h @ kernel + bias)
    want = jaxlora.lora_dense(h, model.kernels[2], model.biases[2], ad, "head")
    got = jaxlora.forward(model, x, lora=ad)
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(jaxlora.forward(model, x)))


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


@pytest.mark.clause("SW-MIXED-1")
@given(data=st.data(), case=cases(max_adapters=3, batch=5))
def test_mixed_batch_rows_match_the_oracle(data, case):
    """SW-MIXED-1: in a mixed batch (`lora=stacked.route(rows)`), row i equals the oracle's
    forward of row i alone with its own adapter (None: the base model), under SW-TOL-1."""
    stacked = jaxlora.stack(jaxlora.conform(case.bank))
    rows = data.draw(
        st.lists(st.sampled_from([*case.names, None]), min_size=5, max_size=5), label="rows"
    )
    y = forward_jit(case.model, case.x, stacked.route(rows))
    want = reference.mixed_forward(
        case.layers, case.x64, [None if r is None else case.adapters[r].ref for r in rows]
    )
    ok, err, allowed = reference.allclose(np.asarray(y.astype(jnp.float32)), want, y.dtype)
    assert ok, f"max error {err} > {allowed} for rows {rows}"
