"""Many adapters in one step (`jaxlora.train.make_slots_step`): each slot learns from its own
rows only, as if trained alone; slots join and leave without recompiling (spec SW-TRAIN-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora
from jaxlora import train
from jaxlora.errors import AdapterNotFoundError, ConfigError, ShapeMismatchError
from jaxlora.models import Llama, LlamaConfig
from jaxlora.routing import ROUTINGS

LLAMA = LlamaConfig(48, 16, 32, 2, 2, 1, 8)
CONFIGS = {
    "a": jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "b": jaxlora.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj", "up_proj"]),
    "c": jaxlora.LoraConfig(
        r=3, lora_alpha=6, target_modules=["o_proj", "v_proj"], init_lora_weights="gaussian"
    ),
}
ROWS, LENGTH, STEPS = 9, 8, 3
IDS = np.asarray([0, 1, 2, 0, 1, 2, 0, 1, 2])
OPT = optax.adam(1e-2)
DROPOUT = 0.2


@pytest.fixture(scope="module")
def setup():
    lm = train.from_llama(Llama.random(LLAMA, seed=2))
    bank = jaxlora.AdapterBank(
        {n: jaxlora.init_adapter(jax.random.key(i), c, lm.shapes) for i, (n, c) in
         enumerate(CONFIGS.items())}
    )  # fmt: skip
    return lm, bank, jaxlora.stack(jaxlora.conform(bank))


def examples(step: int, salt: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(step + 100 * salt)
    return [
        (
            rng.integers(1, 48, size=int(rng.integers(1, 3))).tolist(),
            rng.integers(1, 48, size=int(rng.integers(2, 6))).tolist(),
        )
        for _ in range(ROWS)
    ]


def run_slots(lm, stacked, step_fn, *, ids=IDS, other=None, slot=None, state=None):
    """STEPS steps on the mixed batches; `other` replaces the rows not on `slot`."""
    state = train.init_slots(OPT, stacked) if state is None else state
    for k in range(STEPS):
        ex = examples(k)
        if other is not None:
            alt = examples(k, other)
            ex = [ex[i] if IDS[i] == slot else alt[i] for i in range(ROWS)]
        batch = train.make_batch(ex, LENGTH, ids=ids, row_seeds=np.arange(ROWS))
        state, _ = step_fn(state, lm.base, batch, jax.random.key(50 + k))
    return state


def slot_leaves(state: train.SlotsState, s: int) -> list[np.ndarray]:
    tree = (state.trainable, state.opt_state, state.steps)
    return [np.asarray(x[s]) for x in jax.tree.leaves(tree)]


def same(x: list[np.ndarray], y: list[np.ndarray]) -> bool:
    return all(np.array_equal(p, q) for p, q in zip(x, y, strict=True))


@pytest.mark.clause("SW-TRAIN-5")
@pytest.mark.parametrize("routing", [r for r in ROUTINGS if r != "auto"])
def test_a_slot_is_bitwise_isolated_from_the_other_rows(setup, routing):
    """SW-TRAIN-5 (1): after 3 adam steps with dropout, every slot's factors, optimizer state and
    step count are bitwise the same whether the other rows hold other tokens or are ignored
    (id -1), with every routing kernel."""
    _, _, stacked = setup
    lm = train.from_llama(Llama.random(LLAMA, seed=2), routing=routing)
    step = train.make_slots_step(OPT, lm.logits, dropout=DROPOUT, donate=False)
    mixed = run_slots(lm, stacked, step)
    for s in range(3):
        alone = run_slots(lm, stacked, step, ids=np.where(np.equal(IDS, s), IDS, -1))
        others = run_slots(lm, stacked, step, other=7, slot=s)
        assert same(slot_leaves(mixed, s), slot_leaves(alone, s))
        assert same(slot_leaves(mixed, s), slot_leaves(others, s))
    assert int(mixed.steps[0]) == STEPS and step._cache_size() == 1


@pytest.mark.clause("SW-TRAIN-5", "SW-TRAIN-6")
def test_slots_equal_training_each_adapter_alone(setup):
    """SW-TRAIN-5 (2), SW-TRAIN-6: each adapter trained in the mixed batch, unstacked and trimmed
    to its own rank and targets, equals `make_step` on that adapter alone (its rows, their row
    seeds, the same step keys) within 1e-5 (1 + max|p|); scales unchanged."""
    lm, bank, stacked = setup
    step = train.make_slots_step(OPT, lm.logits, dropout=DROPOUT, donate=False)
    mixed = run_slots(lm, stacked, step)
    trained = jaxlora.bank.trim(jaxlora.bank.unstack(train.stacked_of(mixed, stacked.names)), bank)
    for s, name in enumerate(stacked.names):
        rows = np.nonzero(np.equal(IDS, s))[0]
        single = train.make_step(OPT, lm.logits, dropout=DROPOUT)
        state = train.init(OPT, bank[name])
        for k in range(STEPS):
            ex = examples(k)
            batch = train.make_batch([ex[i] for i in rows], LENGTH, row_seeds=rows)
            state, _ = single(state, lm.base, batch, jax.random.key(50 + k))
        alone = train.adapter_of(state)
        assert set(alone) == set(trained[name])
        for path, w in alone.items():
            got = trained[name][path]
            assert got.rank == w.rank and float(got.scale) == float(bank[name][path].scale)
            for f in ("a", "b"):
                p, q = np.asarray(getattr(w, f)), np.asarray(getattr(got, f))
                assert np.max(np.abs(p - q)) <= 1e-5 * (1 + np.max(np.abs(p))), (name, path, f)
            assert not np.array_equal(np.asarray(w.a), np.asarray(bank[name][path].a))


@pytest.mark.clause("SW-TRAIN-5")
def test_out_of_set_and_rowless_slots_keep_their_state_and_joins_do_not_recompile(setup):
    """SW-TRAIN-5 (3, 5): a slot taken out of the training set, and one with no rows, keep
    factors, optimizer state and step count bitwise; `set_slot` (a new adapter of lower rank
    joins with a fresh optimizer state) and `set_training` do not recompile the step."""
    lm, _, stacked = setup
    step = train.make_slots_step(OPT, lm.logits, donate=False)
    state = run_slots(lm, stacked, step, ids=np.where(IDS == 2, -1, IDS))  # slot 2: no rows
    before = train.init_slots(OPT, stacked)
    assert same(slot_leaves(state, 2), slot_leaves(before, 2))
    kept = slot_leaves(state, 0)
    state = train.set_training(state, 0, False)
    state = run_slots(lm, stacked, step, state=state)
    assert same(slot_leaves(state, 0), kept) and int(state.steps[1]) == 2 * STEPS
    cfg = jaxlora.LoraConfig(r=1, lora_alpha=3, target_modules=["q_proj"])
    new = jaxlora.init_adapter(jax.random.key(9), cfg, lm.shapes)
    state = train.set_slot(state, OPT, 1, new, donate=False)
    assert int(state.steps[1]) == 0
    fresh = jax.vmap(OPT.init)(train.split(dict(stacked.weights))[0])
    assert same(
        [np.asarray(x[1]) for x in jax.tree.leaves(state.opt_state)],
        [np.asarray(x[1]) for x in jax.tree.leaves(fresh)],
    )
    back = jaxlora.bank.trim(jaxlora.bank.unstack(train.stacked_of(state, ["x", "y", "z"])))["y"]
    assert {p: w.rank for p, w in back.items()} == {p: 1 for p in new}
    state = train.set_training(state, 0, True)
    state = run_slots(lm, stacked, step, state=state)
    assert int(state.steps[1]) == STEPS and step._cache_size() == 1


@pytest.mark.clause("SW-TRAIN-5")
def test_per_slot_learning_rate_factor_is_exact(setup):
    """SW-TRAIN-5 (4): slot 1 with `lr_scale` 0.5 under adam(1e-2) is bitwise slot 1 trained
    with adam(5e-3); the other slots are unaffected by its factor."""
    lm, _, stacked = setup
    half = optax.adam(5e-3)
    step = train.make_slots_step(OPT, lm.logits, donate=False)
    scaled = run_slots(lm, stacked, step, state=train.init_slots(OPT, stacked, lr_scale={"b": 0.5}))
    step_half = train.make_slots_step(half, lm.logits, donate=False)
    reference = run_slots(lm, stacked, step_half, state=train.init_slots(half, stacked))
    plain = run_slots(lm, stacked, step)
    assert same(slot_leaves(scaled, 1), slot_leaves(reference, 1))
    assert same(slot_leaves(scaled, 0), slot_leaves(plain, 0))
    assert not same(slot_leaves(scaled, 1), slot_leaves(plain, 1))


@pytest.mark.clause("SW-TRAIN-5")
def test_slot_errors_name_the_problem(setup):
    """SW-TRAIN-5: a slot index out of range, an adapter above the bank's rank, per-slot
    options of the wrong length or with unknown names, a name count that differs from the
    slots, and a non-stacked bank raise jaxlora errors."""
    lm, bank, stacked = setup
    state = train.init_slots(OPT, stacked)
    with pytest.raises(AdapterNotFoundError, match=r"pass an index in \[0, 3\)"):
        train.set_training(state, 3, False)
    big = jaxlora.init_adapter(
        jax.random.key(0), jaxlora.LoraConfig(r=8, target_modules=["q_proj"]), lm.shapes
    )
    with pytest.raises(ShapeMismatchError, match="exceeds the bank's rank 4"):
        train.set_slot(state, OPT, 0, big, donate=False)
    with pytest.raises(ShapeMismatchError, match=r"one value per slot \(3\)"):
        train.init_slots(OPT, stacked, training=[True, False])
    with pytest.raises(AdapterNotFoundError, match="'zz'"):
        train.init_slots(OPT, stacked, lr_scale={"zz": 2.0})
    with pytest.raises(ShapeMismatchError, match="3 slots but 2 names"):
        train.stacked_of(state, ["a", "b"])
    with pytest.raises(ConfigError, match="non-empty StackedBank"):
        train.init_slots(OPT, bank)
    assert isinstance(state.training, jnp.ndarray) and state.slots == 3
