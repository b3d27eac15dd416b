"""Numerics under low precision and hostile values (specs/reliability.md, SW-NUM-1..4).

Every check compares with the float64 oracle (`jaxlora.reference`) evaluated on the very values
jaxlora was given, and every check is also run against a deliberately broken variant (a delta
computed in the base dtype, a routing kernel that mixes rows) to show that it can fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora import reference as ref
from jaxlora.errors import NonFiniteError
from jaxlora.numerics import check_finite, non_finite_entries
from jaxlora.routing import ROUTINGS

LOW = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
PATHS = ["blocks.0.q", "blocks.0.o", "head"]
WIDTHS = [16, 24, 16, 8]


#: `jaxlora.lora_dense` jitted; the layer path (argument 4) is static.
dense_jit = jax.jit(jaxlora.lora_dense, static_argnums=4)


def f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def half_ulp(v: np.ndarray, dtype) -> np.ndarray:
    """Half a unit in the last place of `dtype` at the float64 values `v` (subnormals too)."""
    info = ml_dtypes.finfo(dtype)
    exp = np.floor(np.log2(np.maximum(np.abs(v), np.finfo(np.float64).tiny)))
    return 2.0 ** (np.maximum(exp, info.minexp) - info.nmant - 1)


def rounded_once(y, v: np.ndarray, dtype, base_magnitude: np.ndarray | float = 0.0) -> bool:
    """Is `y` (dtype) the float64 value `v` rounded to `dtype` once, give or take float32
    rounding and, when `base_magnitude` (`|x W| + |c|`) is given, one ulp of the base layer's own
    low-precision rounding (XLA may keep excess precision there, so it is not pinned down)?"""
    allowed = half_ulp(v, dtype) * (1 + 1e-3) + np.abs(v) * 2.0**-22
    if np.any(base_magnitude):
        allowed = allowed + 2 * half_ulp(np.asarray(base_magnitude, np.float64), dtype)
    return bool(np.all(np.abs(f64(y) - v) <= allowed))


def make_setup(dtype, seed: int = 0, alpha: float = 16.0):
    key = jax.random.key(seed)
    model = jaxlora.DenseChain.init(key, PATHS, WIDTHS, dtype=dtype)
    bank = jaxlora.AdapterBank()
    for i, name in enumerate(["a", "b", "c"]):
        cfg = jaxlora.LoraConfig(
            r=2 + 2 * i,
            lora_alpha=alpha,
            target_modules=PATHS[: 2 + i % 2],
            init_lora_weights=False,
        )
        ad = jaxlora.init_adapter(jax.random.fold_in(key, 10 + i), cfg, model.layer_shapes())
        bank = bank.add(name, ad)
    x = jax.random.normal(jax.random.fold_in(key, 99), (6, WIDTHS[0])).astype(dtype)
    return model, jaxlora.conform(bank), x


def ref_layers(model) -> list:
    return [
        (p, f64(k), f64(b))
        for p, k, b in zip(model.paths, model.kernels, model.biases, strict=True)
    ]


def ref_adapter(adapter) -> ref.RefAdapter:
    """The oracle's view of a jaxlora adapter (zero-scale padding layers from `conform` dropped)."""
    adapter = {p: w for p, w in adapter.items() if float(w.scale) != 0.0}
    scales = {float(w.scale) for w in adapter.values()}
    assert len(scales) == 1
    weights = {p: (f64(w.a), f64(w.b)) for p, w in adapter.items()}
    rank = max(w.rank for w in adapter.values())
    return ref.RefAdapter(r=rank, lora_alpha=1.0, weights=weights, fixed_scale=scales.pop())


def oracle_delta(x, w) -> np.ndarray:
    return (f64(x) @ f64(w.a)) @ f64(w.b) * float(w.scale)


def base_dtype_dense(x, kernel, bias, weights):
    """BROKEN variant: the delta computed in the base dtype (what SW-NUM-1 forbids)."""
    y = x @ kernel + bias
    for w in weights:
        y = y + ((x @ w.a.astype(x.dtype)) @ w.b.astype(x.dtype)) * w.scale.astype(x.dtype)
    return y


# -- SW-NUM-1 -----------------------------------------------------------------------------------


@pytest.mark.clause("SW-NUM-1")
@pytest.mark.parametrize("dtype_name", sorted(LOW))
def test_low_precision_base_fp32_adapter_layer_rounds_once(dtype_name):
    """SW-NUM-1: bf16/fp16 base with fp32 adapters: each layer's output is the exact
    `x W + c + s (x A) B` rounded to the base dtype once, up to the base layer's own rounding
    (single-name and mixed, every layer and adapter); a delta computed in the base dtype fails
    the same check."""
    dtype = LOW[dtype_name]
    model, bank, x = make_setup(dtype)
    stacked = jaxlora.stack(bank)
    checked = 0
    for layer, (path, kernel, bias) in enumerate(
        zip(model.paths, model.kernels, model.biases, strict=True)
    ):
        if layer:  # the next layer's input, as the chain computes it
            prev = model.kernels[layer - 1], model.biases[layer - 1]
            x = jnp.tanh(dense_jit(x, *prev, None, model.paths[layer - 1]))
        magnitude = np.abs(f64(x) @ f64(kernel)) + np.abs(f64(bias))
        for name in bank.names:
            w = bank[name][path]
            if float(w.scale) == 0.0:  # a zero layer added by conform
                continue
            assert w.a.dtype == jnp.float32
            exact = f64(x) @ f64(kernel) + f64(bias) + oracle_delta(x, w)
            y = dense_jit(x, kernel, bias, {path: w}, path)
            assert y.dtype == dtype
            assert rounded_once(y, exact, dtype, magnitude), (path, name)
            routed = stacked.route([name] * x.shape[0])
            y_mixed = dense_jit(x, kernel, bias, routed, path)
            assert y_mixed.dtype == dtype
            assert rounded_once(y_mixed, exact, dtype, magnitude), (path, name, "mixed")
            broken = base_dtype_dense(x, kernel, bias, [w])
            assert not rounded_once(broken, exact, dtype, magnitude), "the check cannot fail"
            checked += 1
    assert checked >= 4


@pytest.mark.clause("SW-NUM-1")
@pytest.mark.parametrize("dtype_name", sorted(LOW))
def test_low_precision_chain_and_merge_match_oracle(dtype_name):
    """SW-NUM-1: the whole chain in bf16/fp16 with fp32 adapters keeps the base dtype and meets
    SW-TOL-1 against the float64 oracle; merge keeps the kernel dtype and rounds
    `W + s A B` (computed in float32) once."""
    dtype = LOW[dtype_name]
    model, bank, x = make_setup(dtype, seed=1)
    fwd = jax.jit(jaxlora.forward)
    for active in (["a"], ["b", "c"]):
        y = fwd(model, x, jaxlora.select(bank, active))
        assert y.dtype == dtype
        y_ref = ref.chain_forward(ref_layers(model), f64(x), [ref_adapter(bank[n]) for n in active])
        ok, err, allowed = ref.allclose(f64(y), y_ref, dtype_name)
        assert ok, f"{active}: max error {err} > {allowed}"

    merged = jaxlora.merge(model, bank["a"], safe=True)
    for path, kernel, new in zip(model.paths, model.kernels, merged.kernels, strict=True):
        assert new.dtype == dtype
        w = bank["a"][path]
        expected = f64(kernel) + f64(w.a) @ f64(w.b) * float(w.scale)
        assert rounded_once(new, expected, dtype), path


# -- SW-NUM-2 -----------------------------------------------------------------------------------


@pytest.mark.clause("SW-NUM-2")
@given(
    name=st.sampled_from(["a", "b", "c"]),
    path=st.sampled_from(PATHS[:2]),
    factor=st.sampled_from(["a", "b", "scale"]),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.integers(0, 10_000),
)
def test_check_finite_names_the_poisoned_factor(name, path, factor, bad, where):
    """SW-NUM-2: one NaN/Inf anywhere in a bank (any adapter, layer, factor) makes check_finite
    raise NonFiniteError naming that adapter, layer and factor; the bank is unchanged and a clean
    bank passes through as the same object."""
    _, bank, _ = _FLOAT32_SETUP
    assert check_finite(bank) is bank
    w = bank[name][path]
    arr = np.array(getattr(w, factor), dtype=np.float32)
    arr.reshape(-1)[where % arr.size] = bad
    poisoned = bank.replace(name, {**bank[name], path: _replace(w, factor, jnp.asarray(arr))})
    checks = [
        (lambda: check_finite(poisoned), name),
        (lambda: check_finite(poisoned[name]), None),
        (lambda: jaxlora.stack(poisoned), name),  # stacking refuses too (SW-NUM-3)
    ]
    for call, label in checks:
        with pytest.raises(NonFiniteError) as info:
            call()
        msg = str(info.value)
        assert f"layer {path!r}" in msg and f"factor `{factor}`" in msg
        assert ("1 NaN" if np.isnan(bad) else "1 Inf") in msg
        if label is not None:
            assert f"adapter {name!r}" in msg
    assert non_finite_entries(poisoned) == [(name, path, factor)]
    assert check_finite(bank) is bank  # the original bank did not change


def _replace(w, factor, value):
    parts = {"a": w.a, "b": w.b, "scale": w.scale, factor: value}
    return jaxlora.LoraWeights(parts["a"], parts["b"], parts["scale"])


_FLOAT32_SETUP = make_setup(jnp.float32, seed=2)


@pytest.mark.clause("SW-NUM-2")
@pytest.mark.clause("SW-MERGE-4")
def test_safe_merge_refuses_before_writing_and_unsafe_merge_poisons():
    """SW-NUM-2, SW-MERGE-4: merge(safe=True) refuses an adapter with NaN before building
    anything (the model stays as it was); without `safe` the merged kernel would be NaN, which
    is what the option prevents."""
    model, bank, _ = _FLOAT32_SETUP
    w = bank["a"][PATHS[0]]
    poisoned = {**bank["a"], PATHS[0]: _replace(w, "b", w.b.at[0, 0].set(jnp.nan))}
    before = [np.array(k) for k in model.kernels]
    with pytest.raises(NonFiniteError, match=PATHS[0]):
        jaxlora.merge(model, poisoned, safe=True)
    for k, k0 in zip(model.kernels, before, strict=True):
        np.testing.assert_array_equal(np.asarray(k), k0)
    unsafe = jaxlora.merge(model, poisoned)
    assert not np.all(np.isfinite(np.asarray(unsafe.kernels[0])))


# -- SW-NUM-3 -----------------------------------------------------------------------------------


def onehot_routed_delta(x, stacked, ids):
    """BROKEN variant: dense one-hot routing; 0 * NaN spreads a bad slot to every row."""
    onehot = jax.nn.one_hot(ids, stacked.a.shape[0], dtype=jnp.float32)
    per_slot = jnp.einsum("bi,sir,sro->sbo", x.astype(jnp.float32), stacked.a, stacked.b)
    return jnp.einsum("bs,sbo->bo", onehot * stacked.scale[None], per_slot)


ROUTING_METHODS = list(ROUTINGS)


@pytest.mark.clause("SW-NUM-3")
@pytest.mark.parametrize("method", ROUTING_METHODS)
def test_non_finite_adapter_stays_in_its_rows(method):
    """SW-NUM-3: a NaN/Inf adapter never reaches another row of a mixed batch. Stacking refuses
    it (NonFiniteError naming it and the layer); and a NaN that reaches a stacked bank another
    way (written into its arrays, as an optimizer step could) stays in its own rows under every
    routing method: those rows are not finite, every other row (other adapters, no adapter)
    meets SW-TOL-1 against the oracle. A one-hot routing kernel (0 * NaN) fails the check."""
    model, bank, x = _FLOAT32_SETUP
    w = bank["b"][PATHS[0]]
    bad = bank.replace("b", {**bank["b"], PATHS[0]: _replace(w, "a", w.a.at[1, 0].set(jnp.nan))})
    with pytest.raises(NonFiniteError) as refused:
        jaxlora.stack(bad)
    assert "'b'" in str(refused.value) and PATHS[0] in str(refused.value)
    stacked = jaxlora.stack(bank)
    slot, sw = stacked.slot("b"), stacked.weights[PATHS[0]]
    poisoned = _replace(sw, "a", sw.a.at[slot, 1, 0].set(jnp.nan))
    stacked = jaxlora.StackedBank({**stacked.weights, PATHS[0]: poisoned}, stacked.names)
    rows = ["a", "b", None, "c", "b", "a"]
    ids = stacked.ids(rows)
    broken = np.asarray(onehot_routed_delta(x, poisoned, jnp.asarray(ids)))
    assert not np.all(np.isfinite(broken[ids != slot])), "the check cannot fail"
    fwd = jax.jit(jaxlora.forward, static_argnames="routing")
    y = np.asarray(fwd(model, x, stacked.route(rows), routing=method))
    layers = ref_layers(model)
    for i, row in enumerate(rows):
        if row == "b":
            assert not np.all(np.isfinite(y[i])), f"row {i}: the NaN did not reach its own row"
            continue
        active = [] if row is None else [ref_adapter(bank[row])]
        y_ref = ref.chain_forward(layers, f64(x[i : i + 1]), active)
        ok, err, allowed = ref.allclose(y[i : i + 1], y_ref, "float32")
        assert ok, f"row {i} ({row}): error {err} > {allowed}"


# -- SW-NUM-4 -----------------------------------------------------------------------------------


def _overflow_case(adapter_dtype, x_value, a_value, alpha, r=1):
    """One fp16 layer (zero kernel and bias) and one adapter with constant factors."""
    d_in, d_out = 4, 3
    x = jnp.full((2, d_in), x_value, jnp.float16)
    kernel, bias = jnp.zeros((d_in, d_out), jnp.float16), jnp.zeros((d_out,), jnp.float16)
    cfg = jaxlora.LoraConfig(r=r, lora_alpha=alpha)
    a = np.full((d_in, r), a_value, np.float32)
    b = np.full((r, d_out), 1.0 / r, np.float32)
    w = jaxlora.make_adapter(cfg, {"l": (a, b)}, dtype=adapter_dtype)["l"]
    expected = f64(x) @ f64(w.a) @ f64(w.b) * float(w.scale)
    return x, kernel, bias, w, expected


@pytest.mark.clause("SW-NUM-4")
@pytest.mark.parametrize(
    "x_value, a_value, alpha",
    [(100.0, 300.0, 1e-3), (1.0, 1e-3, 1e6), (8.0, 4.0, 2e5)],
    ids=["xA-beyond-fp16", "alpha-beyond-fp16", "output-beyond-fp16"],
)
def test_fp16_overflow_rule(x_value, a_value, alpha):
    """SW-NUM-4: over a float16 base, float32 adapters compute `((x A) B) s` in float32, so an
    intermediate (x A, or the scale alpha/r) beyond 65504 is harmless and the output is Inf only
    where the float32 result itself rounds beyond float16's range; float16 adapters (and a delta
    computed in the base dtype) overflow as soon as the intermediate does."""
    x, kernel, bias, w, expected = _overflow_case(jnp.float32, x_value, a_value, alpha)
    y = np.asarray(dense_jit(x, kernel, bias, {"l": w}, "l"))
    fp16_max = float(ml_dtypes.finfo(np.float16).max)
    beyond = np.abs(expected) >= fp16_max + half_ulp(np.asarray(fp16_max), np.float16)
    np.testing.assert_array_equal(np.isinf(y), beyond)
    assert rounded_once(y[~beyond], expected[~beyond], np.float16)

    intermediate = max(abs(x_value * a_value * 4), alpha)
    if intermediate > fp16_max:  # the rule's other half: fp16 compute overflows
        x16, k16, b16, w16, _ = _overflow_case(jnp.float16, x_value, a_value, alpha)
        y16 = jaxlora.lora_dense(x16, k16, b16, {"l": w16}, "l")
        assert not np.all(np.isfinite(np.asarray(y16)))
        broken = np.asarray(base_dtype_dense(x, kernel, bias, [w]))
        assert not np.all(np.isfinite(broken)), "the check cannot tell the broken variant"


@pytest.mark.clause("SW-NUM-3")
def test_replace_slot_refuses_non_finite_adapter():
    """SW-NUM-3: writing a NaN adapter into a slot of a stacked bank is refused, naming it, and
    the bank is unchanged (the write is not donated before the check)."""
    _, bank, _ = _FLOAT32_SETUP
    stacked = jaxlora.stack(bank)
    w = bank["b"][PATHS[0]]
    bad = {**bank["b"], PATHS[0]: _replace(w, "b", w.b.at[0, 0].set(jnp.inf))}
    with pytest.raises(NonFiniteError, match=r"'bad'.*" + PATHS[0].replace(".", r"\.")):
        jaxlora.replace_slot(stacked, "b", bad, name="bad")
    assert stacked.names == bank.names
    np.testing.assert_array_equal(stacked.weights[PATHS[0]].b[1], bank["b"][PATHS[0]].b)
