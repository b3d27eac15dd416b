"""Compile counts, measured (spec SW-CONFORM-3): switching among conformed adapters of different
ranks, alphas and target sets, and changing mixed-batch ids, never retraces the jitted forward;
without `conform` a rank change does retrace (so the first test could fail)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference

PATHS = ["blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v", "head"]
WIDTHS = [8, 16, 16, 16, 16, 4]
#: (r, alpha, rsLoRA, target_modules): 8 adapters, all ranks and target sets different
CONFIGS = [
    (1, 2.0, False, ["q"]),
    (2, 4.0, True, ["v"]),
    (3, 8.0, False, ["head"]),
    (4, 16.0, False, r"blocks\.0\..*"),
    (6, 1.0, True, "all-linear"),
    (8, 8.0, False, ["blocks.1.q", "head"]),
    (16, 32.0, True, ["q", "v"]),
    (32, 16.0, False, r"blocks\.1\..*"),
]


def build(seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = {
        p: (
            rng.uniform(-0.3, 0.3, (WIDTHS[i], WIDTHS[i + 1])),
            rng.uniform(-0.3, 0.3, WIDTHS[i + 1]),
        )
        for i, p in enumerate(PATHS)
    }
    model = jaxlora.DenseChain.from_layers(layers, dtype=jnp.float32)
    bank, refs = jaxlora.AdapterBank(), {}
    for i, (r, alpha, rslora, targets) in enumerate(CONFIGS):
        cfg = jaxlora.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=targets)
        factors = {
            p: (
                rng.normal(0, 0.3, (model.layer_shapes()[p][0], r)).astype(np.float32),
                rng.normal(0, 0.3, (r, model.layer_shapes()[p][1])).astype(np.float32),
            )
            for p in jaxlora.match_targets(targets, PATHS)
        }
        bank = bank.add(f"ad{i}", jaxlora.make_adapter(cfg, factors))
        refs[f"ad{i}"] = reference.RefAdapter(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            weights={
                p: (a.astype(np.float64), b.astype(np.float64)) for p, (a, b) in factors.items()
            },
        )
    layers64 = [
        (p, np.asarray(model.kernels[i], np.float64), np.asarray(model.biases[i], np.float64))
        for i, p in enumerate(PATHS)
    ]
    x = jnp.asarray(rng.normal(size=(4, WIDTHS[0])), jnp.float32)
    return model, bank, refs, layers64, x


def fresh_jit(fn):
    """`jax.jit` of a new wrapper: jit objects of one function share their compilation cache,
    so `_cache_size()` would also count other tests' compilations."""
    return jax.jit(lambda *args: fn(*args))


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


@pytest.mark.clause("SW-CONFORM-3")
def test_switching_among_conformed_adapters_compiles_once():
    """SW-CONFORM-3: 8 conformed adapters with different ranks (1..32), alphas, rsLoRA flags and
    target sets are all served by one trace and one compilation of the jitted forward, in any
    switching order; every output still matches the oracle of its own adapter."""
    model, bank, refs, layers64, x = build()
    assert len({frozenset(ad) for ad in bank.values()}) == 8  # 8 different target sets
    assert len({w.rank for ad in bank.values() for w in ad.values()}) == 8
    conformed = jaxlora.conform(bank)
    fwd = jax.jit(chex.assert_max_traces(jaxlora.forward, n=1))
    order = list(bank.names) + list(reversed(bank.names)) + ["ad3", "ad0", "ad7"]
    outputs = {}
    for name in order:
        y = fwd(model, x, jaxlora.select(conformed, name))
        outputs.setdefault(name, np.asarray(y))
        ok, err, allowed = reference.allclose(
            y, reference.chain_forward(layers64, x, [refs[name]]), "float32"
        )
        assert ok, (name, err, allowed)
    assert fwd._cache_size() == 1
    assert len({o.tobytes() for o in outputs.values()}) == 8  # the adapters really differ


@pytest.mark.clause("SW-CONFORM-3")
def test_without_conform_a_rank_change_retraces():
    """SW-CONFORM-3: without `conform`, two adapters that differ only in rank have different
    shapes, so the jitted forward traces again: the trace counter of the previous test can fail."""
    model, _, _, _, x = build()
    shapes = model.layer_shapes()
    bank = jaxlora.AdapterBank()
    for name, r in (("r2", 2), ("r4", 4)):
        cfg = jaxlora.LoraConfig(r=r, target_modules=["q"], init_lora_weights=False)
        bank = bank.add(name, jaxlora.init_adapter(jax.random.key(r), cfg, shapes))
    fwd = fresh_jit(jaxlora.forward)
    fwd(model, x, jaxlora.select(bank, "r2"))
    fwd(model, x, jaxlora.select(bank, "r4"))
    assert fwd._cache_size() == 2
    counted = jax.jit(chex.assert_max_traces(jaxlora.forward, n=1))
    counted(model, x, jaxlora.select(bank, "r2"))
    with pytest.raises(AssertionError, match=r"trace"):
        counted(model, x, jaxlora.select(bank, "r4"))
    # conforming the same two adapters removes the retrace
    conformed = jaxlora.conform(bank)
    fwd2 = fresh_jit(jaxlora.forward)
    for name in ("r2", "r4", "r2"):
        fwd2(model, x, jaxlora.select(conformed, name))
    assert fwd2._cache_size() == 1


@pytest.mark.clause("SW-CONFORM-3", "SW-MIXED-1")
def test_changing_mixed_batch_ids_does_not_retrace():
    """SW-CONFORM-3, SW-MIXED-1: the mixed-batch forward is traced once for any per-row ids
    (including rows without adapter); each call's rows match the oracle."""
    model, bank, refs, layers64, x = build()
    stacked = jaxlora.stack(jaxlora.conform(bank))
    fwd = jax.jit(chex.assert_max_traces(jaxlora.forward, n=1))
    rng = np.random.default_rng(1)
    for _ in range(6):
        rows = [None if k < 0 else stacked.names[k] for k in rng.integers(-1, 8, size=4)]
        y = fwd(model, x, stacked.route(rows))
        want = reference.mixed_forward(
            layers64, np.asarray(x, np.float64), [None if r is None else refs[r] for r in rows]
        )
        ok, err, allowed = reference.allclose(y, want, "float32")
        assert ok, (rows, err, allowed)
    assert fwd._cache_size() == 1
