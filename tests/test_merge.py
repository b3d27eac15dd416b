"""Merging adapters into kernels and undoing it (spec SW-MERGE-1..4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference


def leaves_bytes(tree) -> list[bytes]:
    return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.clause("SW-MERGE-1", "SW-MERGE-2")
def test_merge_into_a_nested_parameter_tree():
    """SW-MERGE-1, SW-MERGE-2: merging into a Flax-style nested dict (NumPy leaves) builds a new
    tree with the oracle's kernels at the targeted paths, shares untouched leaves, and does not
    modify the given tree."""
    rng = np.random.default_rng(0)
    params = {
        "blocks": [
            {"q": {"kernel": rng.normal(size=(4, 6)), "bias": np.zeros(6)}},
            {"q": {"kernel": rng.normal(size=(6, 6)), "bias": np.zeros(6)}},
        ],
        "head": {"kernel": rng.normal(size=(6, 2))},
    }
    snapshot = leaves_bytes(params)
    a, b = rng.normal(size=(6, 3)), rng.normal(size=(3, 6))
    cfg = jaxlora.LoraConfig(r=3, lora_alpha=6.0, use_rslora=True)
    adapter = jaxlora.make_adapter(cfg, {"blocks.1.q": (a, b)})
    merged = jaxlora.merge(params, {"mine": adapter})
    assert leaves_bytes(params) == snapshot
    ref = reference.RefAdapter(r=3, lora_alpha=6.0, use_rslora=True, weights={"blocks.1.q": (a, b)})
    layers = [("blocks.1.q", params["blocks"][1]["q"]["kernel"], np.zeros(6))]
    want = reference.merge(layers, [ref])[0][1]
    ok, err, allowed = reference.allclose(merged["blocks"][1]["q"]["kernel"], want, "float32")
    assert ok, (err, allowed)
    assert merged["blocks"][0]["q"]["kernel"] is params["blocks"][0]["q"]["kernel"]
    assert merged["head"]["kernel"] is params["head"]["kernel"]


@pytest.mark.clause("SW-MERGE-4", "SW-ERROR-1")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_safe_merge_refuses_non_finite_deltas(bad):
    """SW-MERGE-4, SW-ERROR-1: `safe=True` raises NonFiniteError naming the adapter and layer
    before anything is built; the parameters are unchanged; finite adapters merge as without
    `safe`."""
    model = jaxlora.DenseChain.from_layers(
        {"l0": (np.eye(3), np.zeros(3)), "l1": (np.eye(3), np.zeros(3))}, dtype=jnp.float32
    )
    good = jaxlora.make_adapter(jaxlora.LoraConfig(r=1), {"l0": (np.ones((3, 1)), np.ones((1, 3)))})
    b = np.ones((1, 3))
    b[0, 1] = bad
    broken = jaxlora.make_adapter(jaxlora.LoraConfig(r=1), {"l1": (np.ones((3, 1)), b)})
    before = leaves_bytes(model)
    bank = jaxlora.AdapterBank({"good": good, "broken": broken})
    with pytest.raises(jaxlora.errors.NonFiniteError, match=r"adapter 'broken', layer 'l1'"):
        jaxlora.merge(model, bank, safe=True)
    with pytest.raises(jaxlora.errors.NonFiniteError, match=r"adapter #1, layer 'l1'"):
        jaxlora.merge(model, [good, broken], safe=True)
    assert leaves_bytes(model) == before
    safe = jaxlora.merge(model, [good], safe=True)
    assert leaves_bytes(safe) == leaves_bytes(jaxlora.merge(model, good))
