"""`LoraWeights`, `LoraConfig`, `make_adapter`, `init_adapter` and `lora_dense`
(spec SW-NOTATION-1, SW-SCALE-*, SW-TARGET-1, SW-FORWARD-1, SW-CONFIG-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference


@pytest.mark.clause("SW-NOTATION-1", "SW-FORWARD-1")
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)])
def test_lora_dense_uses_in_r_and_r_out_orientation(batch_shape):
    """SW-NOTATION-1, SW-FORWARD-1: `a` is `[in, r]`, `b` is `[r, out]`, the kernel `[in, out]`;
    `lora_dense` over any leading batch shape equals the oracle's `x W + c + s (x A) B`."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*batch_shape, 6)).astype(np.float32)
    w, c = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    a, b = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    lw = jaxlora.LoraWeights(jnp.asarray(a), jnp.asarray(b), jnp.asarray(0.75))
    assert (lw.in_features, lw.rank, lw.out_features) == (6, 3, 4)
    y = jaxlora.lora_dense(jnp.asarray(x), jnp.asarray(w), jnp.asarray(c), {"p": lw}, "p")
    want = reference.layer_forward(x, w, c, [(a.astype(np.float64), b.astype(np.float64), 0.75)])
    assert y.shape == (*batch_shape, 4)
    assert reference.allclose(y, want, "float32")[0]
    ok, _, _ = reference.allclose(lw.delta(), 0.75 * a.astype(np.float64) @ b, "float32")
    assert ok


@pytest.mark.clause("SW-SCALE-1", "SW-SCALE-2", "SW-SCALE-3", "SW-CONFORM-3")
def test_scale_is_an_array_leaf_from_the_config():
    """SW-SCALE-1, SW-SCALE-2, SW-SCALE-3, SW-CONFORM-3: `make_adapter` sets each layer's scale
    from the config (patterns included) as a 0-d float32 leaf, so adapters that differ only in
    alpha or rsLoRA have the same pytree structure."""
    factors = {
        "blocks.0.q": (np.ones((4, 2)), np.ones((2, 4))),
        "blocks.0.v": (np.ones((4, 8)), np.ones((8, 4))),
    }
    cfg = jaxlora.LoraConfig(
        r=2, lora_alpha=3.0, rank_pattern={"v": 8}, alpha_pattern={"blocks.0.v": 32.0}
    )
    ad = jaxlora.make_adapter(cfg, factors)
    assert float(ad["blocks.0.q"].scale) == 3.0 / 2 and float(ad["blocks.0.v"].scale) == 32.0 / 8
    rs = jaxlora.make_adapter(
        jaxlora.LoraConfig(
            r=2,
            lora_alpha=7.0,
            use_rslora=True,
            rank_pattern={"v": 8},
            alpha_pattern={"blocks.0.v": 32.0},
        ),
        factors,
    )
    assert float(rs["blocks.0.v"].scale) == pytest.approx(32.0 / np.sqrt(8))
    assert jax.tree.structure(ad) == jax.tree.structure(rs)
    assert ad["blocks.0.q"].scale.shape == () and ad["blocks.0.q"].scale.dtype == jnp.float32
    assert jaxlora.scaling(16, 4) == reference.scale(16, 4)
    assert jaxlora.resolve_pattern({"q": 1, "blocks.0.q": 2}, "blocks.0.q", 0) == 1


@pytest.mark.clause("SW-TARGET-1", "SW-SCALE-3", "SW-FORWARD-1")
def test_init_adapter_targets_ranks_and_is_a_no_op():
    """SW-TARGET-1, SW-SCALE-3, SW-FORWARD-1: `init_adapter` creates factors for exactly the
    targeted layers with their resolved ranks; with `init_lora_weights=True`, `b` is zero so the
    forward equals the base model's; otherwise it does not."""
    model = jaxlora.DenseChain.init(
        jax.random.key(0), ["blocks.0.q", "blocks.0.v", "head"], [4] * 4
    )
    shapes = model.layer_shapes()
    cfg = jaxlora.LoraConfig(r=2, target_modules=["q", "v"], rank_pattern={"v": 3})
    ad = jaxlora.init_adapter(jax.random.key(1), cfg, shapes)
    assert {p: w.rank for p, w in ad.items()} == {"blocks.0.q": 2, "blocks.0.v": 3}
    assert list(ad) == reference.targets(["q", "v"], shapes)
    assert all(not np.any(np.asarray(w.b)) and np.any(np.asarray(w.a)) for w in ad.values())
    x = jnp.ones((2, 4))
    base = np.asarray(jaxlora.forward(model, x))
    assert np.array_equal(np.asarray(jaxlora.forward(model, x, lora=ad)), base)
    live = jaxlora.init_adapter(
        jax.random.key(1),
        jaxlora.LoraConfig(r=2, target_modules="head", init_lora_weights=False),
        shapes,
    )
    assert not np.allclose(np.asarray(jaxlora.forward(model, x, lora=live)), base)


@pytest.mark.clause("SW-CONFIG-1")
def test_config_accepts_peft_defaults_and_normalises_lists():
    """SW-CONFIG-1: PEFT's inference-neutral defaults are accepted (`bias="none"`, dropout),
    lists become tuples (the config is immutable), and "all-linear" needs no regex check."""
    cfg = jaxlora.LoraConfig(
        target_modules=["q", "v"], exclude_modules=["head"], bias="none", lora_dropout=0.1
    )
    assert cfg.target_modules == ("q", "v") and cfg.exclude_modules == ("head",)
    assert jaxlora.LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    with pytest.raises(jaxlora.errors.UnsupportedFeatureError, match="lora_bias=True"):
        jaxlora.LoraConfig(lora_bias=True)
    with pytest.raises(jaxlora.errors.ConfigError, match=r"alpha_pattern\['v'\]"):
        jaxlora.LoraConfig(alpha_pattern={"v": float("inf")})
    with pytest.raises(jaxlora.errors.ConfigError, match=r"rank_pattern\['v'\].*got 0"):
        jaxlora.LoraConfig(rank_pattern={"v": 0})
    with pytest.raises(jaxlora.errors.ConfigError, match=r"target_modules '\(q' is not a valid"):
        jaxlora.LoraConfig(target_modules="(q")
    with pytest.raises(jaxlora.errors.ShapeMismatchError, match=r"config gives rank 3.*rank 2"):
        jaxlora.make_adapter(jaxlora.LoraConfig(r=3), {"l0": (np.ones((4, 2)), np.ones((2, 4)))})
