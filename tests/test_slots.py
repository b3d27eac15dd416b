"""Slot updates of a StackedBank (hotswap) against the NumPy oracle (specs/routing.md §3)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import reference
from jaxlora.errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ShapeMismatchError,
    TargetNotFoundError,
)
from jaxlora.slots import replace_slot

PATHS = ("blocks.0.q", "blocks.0.v", "head")
MODEL = jaxlora.DenseChain.init(jax.random.key(0), PATHS, [6, 8, 8, 4])
SHAPES = MODEL.layer_shapes()
X = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6)), jnp.float32)
ROWS = ["a", "b", None, "c", "b", "a"]


def adapter(seed: int, r: int, targets, alpha: float = 4.0):
    cfg = jaxlora.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    return jaxlora.init_adapter(jax.random.key(seed), cfg, SHAPES)


def ref_adapter(ad) -> reference.RefAdapter:
    """The oracle's view of a jaxlora adapter whose layers share one scale."""
    (scale,) = {float(w.scale) for w in ad.values()}
    weights = {p: (np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)) for p, w in ad.items()}
    return reference.RefAdapter(r=1, lora_alpha=1.0, weights=weights, fixed_scale=scale)


def layers():
    return [
        (p, np.asarray(k, np.float64), np.asarray(b, np.float64))
        for p, k, b in zip(MODEL.paths, MODEL.kernels, MODEL.biases, strict=True)
    ]


def make_stacked():
    bank = jaxlora.AdapterBank()
    bank = bank.add("a", adapter(1, 2, ["q", "v"]))
    bank = bank.add("b", adapter(2, 4, ["head"]))
    bank = bank.add("c", adapter(3, 1, "all-linear"))
    return bank, jaxlora.stack(jaxlora.conform(bank))


@pytest.mark.clause("SW-SLOT-1", "SW-SLOT-2")
@pytest.mark.parametrize("donate", [True, False])
def test_replacing_a_slot_changes_only_its_rows_and_does_not_retrace(donate):
    """SW-SLOT-1, SW-SLOT-2: after writing a rank-1, fewer-target adapter into slot 'b', rows of
    that slot equal the oracle under the new adapter, all other rows are bitwise unchanged, the
    jitted forward is not retraced, and donation consumes the old bank only when asked (the old
    bank is intact with donate=False). Renaming the slot changes only the static names: a
    forward jitted over `stacked.weights` is not retraced by it."""
    chex.clear_trace_counter()
    _, stacked = make_stacked()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(stacked, ids):
        return jaxlora.forward(MODEL, X, lora=jaxlora.Routed(stacked, ids), routing="gather")

    ids = jnp.asarray(stacked.ids(ROWS))
    before = np.asarray(fwd(stacked, ids))
    old_b = np.asarray(stacked.weights["head"].a[1])
    new = adapter(9, 1, ["q"], alpha=3.0)
    swapped = replace_slot(stacked, "b", new, donate=donate)
    assert swapped.names == ("a", "b", "c")
    after = np.asarray(fwd(swapped, ids))
    assert fwd._cache_size() == 1

    by_weights = jax.jit(
        lambda w, ids: jaxlora.forward(
            MODEL, X, lora=jaxlora.Routed(jaxlora.StackedBank(w, ()), ids)
        )
    )
    renamed = replace_slot(swapped, 1, new, name="d", donate=False)
    assert renamed.names == ("a", "d", "c") and renamed.slot("d") == 1
    assert np.array_equal(by_weights(renamed.weights, ids), by_weights(swapped.weights, ids))
    assert by_weights._cache_size() == 1

    changed = np.asarray([r == "b" for r in ROWS])
    assert np.array_equal(after[~changed], before[~changed])
    want = reference.mixed_forward(
        layers(), np.asarray(X), [ref_adapter(new) if c else None for c in changed]
    )
    ok, err, allowed = reference.allclose(after[changed], want[changed], "float32")
    assert ok, (err, allowed)
    for path in PATHS:  # zero factors where the new adapter has no target, other slots intact
        if path != "blocks.0.q":
            assert not np.any(np.asarray(swapped.weights[path].a[1]))
    assert stacked.weights["head"].a.is_deleted() is donate
    if not donate:
        assert np.array_equal(np.asarray(stacked.weights["head"].a[1]), old_b)
        assert stacked.names == ("a", "b", "c")


@pytest.mark.clause("SW-SLOT-2")
def test_the_slot_update_compiles_once_for_every_slot():
    """SW-SLOT-2: writing different slots by index reuses one compiled update (traced index)."""
    from jaxlora import slots as slots_module

    _, stacked = make_stacked()
    before = slots_module._write_copy._cache_size()
    for i in range(3):
        stacked = replace_slot(stacked, i, adapter(20 + i, 2, ["v"]), donate=False)
    assert slots_module._write_copy._cache_size() - before <= 1
    assert stacked.names == ("a", "b", "c")


@pytest.mark.clause("SW-SLOT-3")
def test_slot_errors_name_the_problem_and_write_nothing():
    """SW-SLOT-3: unknown slot names and indices, a taken name, unknown layers, wrong in/out and
    a rank above the bank's raise jaxlora errors before anything is written."""
    _, stacked = make_stacked()
    ok = adapter(5, 2, ["v"])
    with pytest.raises(AdapterNotFoundError, match=r"'zz'.*'a', 'b', 'c'"):
        replace_slot(stacked, "zz", ok)
    with pytest.raises(AdapterNotFoundError, match=r"slot 3 .*3 slots.*\[0, 3\)"):
        replace_slot(stacked, 3, ok)
    with pytest.raises(AdapterExistsError, match=r"'c'.*slot 2 already"):
        replace_slot(stacked, "a", ok, name="c")
    stray = {"blocks.9.q": ok["blocks.0.v"]}
    with pytest.raises(TargetNotFoundError, match=r"'blocks\.9\.q'.*'blocks\.0\.q'"):
        replace_slot(stacked, "a", stray)
    wrong = {"head": jaxlora.LoraWeights(jnp.ones((8, 2)), jnp.ones((2, 5)), jnp.asarray(1.0))}
    with pytest.raises(ShapeMismatchError, match=r"'head'.*\(8, 4\).*b\(2, 5\)"):
        replace_slot(stacked, "a", wrong)
    big = adapter(6, 8, ["head"])
    with pytest.raises(ShapeMismatchError, match=r"rank 8 exceeds the bank's rank 4.*max_rank=8"):
        replace_slot(stacked, "a", big)
    assert not stacked.weights["head"].a.is_deleted()
    assert stacked.names == ("a", "b", "c")
