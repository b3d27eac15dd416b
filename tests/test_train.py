"""Training one adapter (`jaxlora.train`): what is trained, PEFT's init, dropout, the causal-LM
loss and gradient accumulation, on the Llama, Linen and NNX models (spec SW-TRAIN-1..4)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora
from jaxlora import train
from jaxlora.errors import ConfigError, ShapeMismatchError
from jaxlora.lora import add_lora, lora_input
from jaxlora.models import Llama, LlamaConfig
from jaxlora.types import Active, Dropout, LoraWeights

LLAMA = LlamaConfig(48, 16, 32, 1, 2, 1, 8)


def adapter(key: int, shapes, r=2, alpha=4.0, targets=("l0", "l1"), init=False):
    cfg = jaxlora.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=init
    )
    return jaxlora.init_adapter(jax.random.key(key), cfg, shapes)


SHAPES = {"l0": (6, 5), "l1": (5, 4)}


def leaves_equal(x, y) -> bool:
    lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
    return len(lx) == len(ly) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(lx, ly, strict=True)
    )


@pytest.mark.clause("SW-TRAIN-1")
def test_split_keeps_factors_and_scales_apart_and_join_restores():
    """SW-TRAIN-1: `split` of an adapter, a bank and a stacked bank puts exactly the `a`/`b`
    arrays in `trainable` and exactly the scales in `frozen`; `join` restores the input."""
    ad = adapter(0, SHAPES)
    bank = jaxlora.AdapterBank({"x": ad, "y": adapter(1, SHAPES, r=2, alpha=8.0)})
    for tree in (ad, bank, jaxlora.stack(bank)):
        trainable, frozen = train.split(tree)
        weights = jax.tree.leaves(tree, is_leaf=lambda w: isinstance(w, LoraWeights))
        assert {id(x) for x in jax.tree.leaves(trainable)} == {
            id(x) for w in weights for x in (w.a, w.b)
        }
        assert {id(x) for x in jax.tree.leaves(frozen)} == {id(w.scale) for w in weights}
        back = train.join(trainable, frozen)
        assert type(back) is type(tree) and leaves_equal(back, tree)
        assert jax.tree.structure(back) == jax.tree.structure(tree)


OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=0.5),
    "lion": optax.lion(1e-3, weight_decay=0.1),
    "adafactor": optax.adafactor(1e-2),
    "lamb": optax.lamb(1e-2),
    "lars": optax.lars(1e-2),
    "rmsprop": optax.rmsprop(1e-2),
    "adagrad": optax.adagrad(1e-2),
    "adabelief": optax.adabelief(1e-2),
    "novograd": optax.novograd(1e-2),
    "yogi": optax.yogi(1e-2),
    "radam": optax.radam(1e-2),
    "noisy_sgd": optax.noisy_sgd(1e-2, key=jax.random.key(0)),
    "clipped_chain": optax.chain(
        optax.clip_by_global_norm(0.1), optax.add_decayed_weights(0.1), optax.adam(1e-2)
    ),
    "schedule": optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)),
}


@pytest.mark.clause("SW-TRAIN-1")
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_no_optax_optimizer_changes_a_scale(name):
    """SW-TRAIN-1: three updates of every optax optimizer tried (weight decay, clipping and
    schedules included) on `split(adapter)[0]` change the factors but leave every scale (so
    alpha) bitwise as it was, with no mask."""
    opt = OPTIMIZERS[name]
    ad = adapter(0, SHAPES, alpha=7.0)
    trainable, frozen = train.split(ad)
    state = opt.init(trainable)
    for i in range(3):
        grads = jax.tree.map(
            lambda x, i=i: jax.random.normal(jax.random.key(i), x.shape), trainable
        )
        updates, state = opt.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    out = train.join(trainable, frozen)
    for path, w in ad.items():
        assert np.asarray(out[path].scale).tobytes() == np.asarray(w.scale).tobytes()
        assert float(out[path].scale) == 7.0 / 2
        assert not np.array_equal(np.asarray(out[path].b), np.asarray(w.b))


@pytest.mark.clause("SW-TRAIN-1")
def test_join_and_split_refuse_mismatched_parts():
    """SW-TRAIN-1: joining parts of different adapters, or in the wrong order, and splitting
    something without LoraWeights raise ConfigError saying what to pass."""
    t1, f1 = train.split(adapter(0, SHAPES))
    _, f2 = train.split(adapter(0, SHAPES, targets=("l0",)))
    with pytest.raises(ConfigError, match="different structures"):
        train.join(t1, f2)
    with pytest.raises(ConfigError, match="takes the two results of split"):
        train.join(f1, t1)
    with pytest.raises(ConfigError, match="without any LoraWeights"):
        train.split({"l0": jnp.ones(3)})


@pytest.fixture(scope="module")
def llama_lm():
    return train.from_llama(Llama.random(LLAMA, seed=1))


def batch_of(seed: int, rows: int = 4, length: int = 7, ids=None) -> train.Batch:
    rng = np.random.default_rng(seed)
    examples = [
        (
            rng.integers(1, 48, size=int(rng.integers(1, 3))).tolist(),
            rng.integers(1, 48, size=int(rng.integers(1, 5))).tolist(),
        )
        for _ in range(rows)
    ]
    return train.make_batch(examples, length, ids=ids)


@pytest.mark.clause("SW-TRAIN-1", "SW-TRAIN-2")
def test_llama_step_trains_factors_from_a_no_op_start(llama_lm):
    """SW-TRAIN-1, SW-TRAIN-2: a fresh PEFT-initialised adapter (B = 0) gives the base logits
    bitwise; adamw with weight decay through `make_step` then moves A and B, lowers the loss,
    and leaves the scales bitwise unchanged."""
    cfg = jaxlora.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"])
    ad = jaxlora.init_adapter(jax.random.key(0), cfg, llama_lm.shapes)
    tokens = batch_of(0).tokens
    base = llama_lm.logits(llama_lm.base, tokens, None)
    fresh = llama_lm.logits(llama_lm.base, tokens, ad)
    assert np.array_equal(np.asarray(base), np.asarray(fresh))
    opt = optax.adamw(3e-2, weight_decay=0.1)
    step = train.make_step(opt, llama_lm.logits)
    state = train.init(opt, ad)
    losses = []
    for i in range(8):
        state, metrics = step(state, llama_lm.base, batch_of(0), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    out = train.adapter_of(state)
    assert int(state.step) == 8 and losses[-1] < losses[0]
    for path, w in ad.items():
        assert float(out[path].scale) == 3.0
        assert not np.array_equal(np.asarray(out[path].a), np.asarray(w.a))
        assert np.any(np.asarray(out[path].b) != 0)


@pytest.mark.clause("SW-TRAIN-2")
def test_init_is_peft_kaiming_uniform_or_gaussian_with_zero_b():
    """SW-TRAIN-2: A is uniform in ±1/sqrt(in) — the bound torch's `kaiming_uniform_(a=sqrt(5))`
    (what PEFT calls) gives for a [r, in] weight — or normal with std 1/r for "gaussian"; B is
    zero in both."""
    import torch

    d_in, r = 400, 32
    bound = 1 / math.sqrt(d_in)
    w = torch.empty(r, d_in)
    torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    for init in (True, "gaussian"):
        cfg = jaxlora.LoraConfig(r=r, target_modules=["l0"], init_lora_weights=init)
        w = jaxlora.init_adapter(jax.random.key(3), cfg, {"l0": (d_in, 8)})["l0"]
        a = np.asarray(w.a)
        assert a.shape == (d_in, r) and not np.any(np.asarray(w.b))
        if init is True:
            assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
            assert abs(a.std() - bound / math.sqrt(3)) < 0.02 * bound
        else:
            assert abs(a.std() - 1 / r) < 0.03 / r and abs(a.mean()) < 0.05 / r


@pytest.mark.clause("SW-TRAIN-2")
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"init_lora_weights": "pissa"}, "must be True, False or 'gaussian'"),
        ({"lora_dropout": 1.0}, r"`lora_dropout` must be a probability in \[0, 1\)"),
        ({"lora_dropout": -0.1}, "got -0.1"),
    ],
)
def test_config_refuses_other_inits_and_bad_dropout(fields, message):
    """SW-TRAIN-2: init schemes other than True/False/"gaussian" and a lora_dropout outside
    [0, 1) raise ConfigError when the LoraConfig is built."""
    with pytest.raises(ConfigError, match=message):
        jaxlora.LoraConfig(r=2, **fields)


def identity_adapter(n: int, scale: float = 1.0) -> LoraWeights:
    return LoraWeights(jnp.eye(n), jnp.eye(n), jnp.asarray(scale))


@pytest.mark.clause("SW-TRAIN-3")
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_mask_statistics(rate):
    """SW-TRAIN-3: through `add_lora` with identity factors the delta is the mask itself: its
    kept fraction is 1 - rate, its mean 1 and its variance rate / (1 - rate) (5 standard
    errors), and the base output is not dropped."""
    n, rows = 256, 64
    x, y = jnp.ones((rows, n)), jnp.full((rows, n), 3.0)
    sel = train.dropout({"l0": identity_adapter(n)}, jax.random.key(7), rate)
    m = np.asarray(add_lora(y, x, sel, "l0")) - 3.0
    count = m.size
    kept = np.mean(m != 0)
    assert abs(kept - (1 - rate)) < 5 * math.sqrt(rate * (1 - rate) / count)
    assert np.allclose(m[m != 0], 1 / (1 - rate), rtol=1e-6)
    var = rate / (1 - rate)
    assert abs(m.mean() - 1) < 5 * math.sqrt(var / count)
    assert abs(m.var() - var) < 5 * var * math.sqrt(2 / count) + 5 * math.sqrt(var / count)


@pytest.mark.clause("SW-TRAIN-3")
def test_dropout_masks_are_independent_per_layer_adapter_and_row_key():
    """SW-TRAIN-3: masks differ between layers and between the adapters of one selection,
    depend only on the key (same key, same mask), and with one key per row a row's mask
    follows its key, not its position in the batch."""
    n = 512
    x = jnp.ones((4, n))
    d = Dropout(jax.random.key(1), jnp.asarray(0.5))
    l0, l1 = (np.asarray(lora_input(x, d, p, 0, jnp.float32)) for p in ("l0", "l1"))
    a1 = np.asarray(lora_input(x, d, "l0", 1, jnp.float32))
    assert np.array_equal(l0, np.asarray(lora_input(x, d, "l0", 0, jnp.float32)))
    for other in (l1, a1):
        agree = np.mean((l0 != 0) == (other != 0))
        assert 0.45 < agree < 0.55  # independent halves agree half the time
    two = Active.of({"l0": identity_adapter(n)}, {"l0": identity_adapter(n)})
    sel = train.dropout(two, jax.random.key(1), 0.5)
    both = np.asarray(add_lora(jnp.zeros((4, n)), x, sel, "l0"))
    assert np.allclose(both, l0 + a1)
    keys = jax.random.split(jax.random.key(2), 4)
    rows = np.asarray(lora_input(x, Dropout(keys, jnp.asarray(0.5)), "l0", 0, jnp.float32))
    order = [2, 0, 3, 1]
    moved = lora_input(x, Dropout(keys[jnp.asarray(order)], jnp.asarray(0.5)), "l0", 0, jnp.float32)
    assert np.array_equal(np.asarray(moved), rows[order])


@pytest.mark.clause("SW-TRAIN-3")
def test_dropout_is_absent_at_inference_and_rate_zero_is_bitwise_identity(llama_lm):
    """SW-TRAIN-3: on the Llama, a forward without `Dropout` is the inference forward and rate 0
    equals it bitwise; rate 0.5 changes the logits, deterministically for one key."""
    cfg = jaxlora.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    ad = jaxlora.init_adapter(jax.random.key(0), cfg, llama_lm.shapes)
    tokens = batch_of(1).tokens
    plain = np.asarray(llama_lm.logits(llama_lm.base, tokens, ad))
    zero = llama_lm.logits(llama_lm.base, tokens, train.dropout(ad, jax.random.key(0), 0.0))
    assert np.array_equal(plain, np.asarray(zero))
    half = [
        np.asarray(
            llama_lm.logits(llama_lm.base, tokens, train.dropout(ad, jax.random.key(k), 0.5))
        )
        for k in (0, 0, 1)
    ]
    assert np.array_equal(half[0], half[1]) and not np.array_equal(half[0], half[2])
    assert not np.allclose(half[0], plain)


@pytest.mark.clause("SW-TRAIN-3")
def test_dropout_errors_name_the_problem():
    """SW-TRAIN-3: a raw uint32 key, a key or rate of the wrong shape and a rate outside [0, 1)
    raise jaxlora errors that say what to pass."""
    x, y = jnp.ones((3, 4)), jnp.zeros((3, 4))
    ad = {"l0": identity_adapter(4)}
    raw = Active(Active.of(ad).adapters, Active.of(ad).gate, Dropout(jax.random.PRNGKey(0), 0.1))
    with pytest.raises(ConfigError, match=r"typed PRNG key \(jax.random.key"):
        add_lora(y, x, raw, "l0")
    two_keys = train.dropout(ad, jax.random.split(jax.random.key(0), 2), 0.1)
    with pytest.raises(ShapeMismatchError, match=r"one per row of the input x\(3, 4\)"):
        add_lora(y, x, two_keys, "l0")
    rates = train.dropout(ad, jax.random.key(0), [0.1, 0.2])
    with pytest.raises(ShapeMismatchError, match=r"one per active adapter \(shape \(1,\)\)"):
        add_lora(y, x, rates, "l0")
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\), got 1.5"):
        train.dropout(ad, jax.random.key(0), 1.5)
    with pytest.raises(ConfigError, match="lora=None has nothing to drop"):
        train.dropout(None, jax.random.key(0), 0.1)


@pytest.mark.clause("SW-TRAIN-4")
def test_causal_lm_loss_masks_prompt_tokens():
    """SW-TRAIN-4: `lm_loss` equals the NumPy mean NLL of the masked targets (position t's
    logits predict token t + 1), prompt tokens contribute nothing, and `group_sums` gives each
    group its own sum and count."""
    rng = np.random.default_rng(0)
    batch = train.make_batch([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], length=6)
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]]
    logits = rng.normal(size=(2, 6, 10)).astype(np.float32)
    tokens, mask = np.asarray(batch.tokens), np.asarray(batch.loss_mask)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]
    want = nll.sum() / mask[:, 1:].sum()
    got = float(train.lm_loss(jnp.asarray(logits), batch.tokens, batch.loss_mask))
    assert abs(got - want) < 1e-6
    changed = logits.copy()
    changed[0, :2] = rng.normal(size=(2, 10))  # the logits predicting the prompt tokens 2, 3
    assert float(train.lm_loss(jnp.asarray(changed), batch.tokens, batch.loss_mask)) == got
    sums, counts = train.group_sums(
        jnp.asarray(logits), batch.tokens, batch.loss_mask, jnp.asarray([1, -1]), 3
    )
    assert np.allclose(np.asarray(sums), [0, nll[0].sum(), 0], atol=1e-6)
    assert np.asarray(counts).tolist() == [0, 2, 0]


@pytest.mark.clause("SW-TRAIN-4")
def test_accumulation_equals_one_batch_and_empty_batches_do_not_step(llama_lm):
    """SW-TRAIN-4: two micro-batches (with different numbers of targets) give the update of the
    whole batch within 1e-5 (1 + max|p|), dropout included (row seeds); a batch with no target
    token leaves the state bitwise unchanged."""
    cfg = jaxlora.LoraConfig(r=2, target_modules=["v_proj", "up_proj"], init_lora_weights=False)
    ad = jaxlora.init_adapter(jax.random.key(0), cfg, llama_lm.shapes)
    opt = optax.adam(1e-2)
    results = []
    for k in (1, 2):
        step = train.make_step(opt, llama_lm.logits, dropout=0.3, accumulate=k, donate=False)
        state = train.init(opt, ad)
        for i in range(3):
            state, _ = step(state, llama_lm.base, batch_of(10 + i), jax.random.key(i))
        results.append(train.adapter_of(state))
    for path in ad:
        for f in ("a", "b"):
            p, q = (np.asarray(getattr(r[path], f)) for r in results)
            assert np.max(np.abs(p - q)) <= 1e-5 * (1 + np.max(np.abs(p)))
    step = train.make_step(opt, llama_lm.logits, donate=False)
    state = train.init(opt, ad)
    empty = batch_of(0)._replace(loss_mask=jnp.zeros((4, 7), jnp.int32))
    new, metrics = step(state, llama_lm.base, empty, jax.random.key(0))
    assert leaves_equal(new, state) and float(metrics["tokens"]) == 0


@pytest.mark.clause("SW-TRAIN-4")
def test_step_and_batch_errors():
    """SW-TRAIN-4: a too-short length, a row count `accumulate` cannot split, a slots step
    without ids, and bad `accumulate` / `dropout` options raise naming the fix."""
    with pytest.raises(ConfigError, match="at least 2"):
        train.make_batch([([], [1])], length=1)
    lm = train.from_llama(Llama.random(LlamaConfig(16, 8, 16, 1, 2, 1, 4)))
    ad = {"model.layers.0.self_attn.q_proj": LoraWeights(jnp.ones((8, 1)), jnp.zeros((1, 8)), 1.0)}
    opt = optax.sgd(0.1)
    step = train.make_step(opt, lm.logits, accumulate=2)
    with pytest.raises(ShapeMismatchError, match="accumulate=2 micro-batches cannot split"):
        step(train.init(opt, ad), lm.base, batch_of(0, rows=3), jax.random.key(0))
    slots = train.make_slots_step(opt, lm.logits)
    state = train.init_slots(opt, jaxlora.stack(jaxlora.AdapterBank({"a": ad})))
    with pytest.raises(ConfigError, match=r"needs batch\.ids"):
        slots(state, lm.base, batch_of(0), jax.random.key(0))
    with pytest.raises(ConfigError, match=r"takes a jaxlora\.train\.Batch"):
        step(train.init(opt, ad), lm.base, (batch_of(0).tokens,), jax.random.key(0))
    with pytest.raises(ShapeMismatchError, match=r"must both be \[rows, length\]"):
        step(
            train.init(opt, ad), lm.base, train.Batch(jnp.ones((2, 3, 1), int), jnp.ones((2, 3))), 0
        )
    wrong_ids = train.make_batch([([], [1, 2])] * 2, 3, ids=[0, 0])._replace(ids=jnp.zeros(3, int))
    with pytest.raises(ShapeMismatchError, match=r"batch.ids has shape \(3,\); it needs one value"):
        slots(state, lm.base, wrong_ids, jax.random.key(0))
    with pytest.raises(ShapeMismatchError, match=r"must be \[B, T, vocab\] for tokens"):
        train.token_nll(jnp.zeros((1, 3, 4)), jnp.zeros((1, 2), int), jnp.zeros((1, 2)))
    with pytest.raises(ConfigError, match="`accumulate` must be a positive int"):
        train.make_step(opt, lm.logits, accumulate=0)
    with pytest.raises(ConfigError, match=r"`dropout` must be a probability in \[0, 1\)"):
        train.make_slots_step(opt, lm.logits, dropout=1.0)


VOCAB, DIM = 24, 16


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        h = nn.Embed(VOCAB, DIM, name="embed")(tokens)
        h = jnp.tanh(nn.Dense(DIM, name="hidden")(h))
        return nn.Dense(VOCAB, name="head")(h)


class NnxLM(nnx.Module):
    def __init__(self, params):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
        self.hidden = nnx.Linear(DIM, DIM, rngs=rngs)
        self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)
        self.embed.embedding[...] = params["embed"]["embedding"]
        for name in ("hidden", "head"):
            getattr(self, name).kernel[...] = params[name]["kernel"]
            getattr(self, name).bias[...] = params[name]["bias"]

    def __call__(self, tokens):
        return self.head(jnp.tanh(self.hidden(self.embed(tokens))))


@pytest.mark.clause("SW-TRAIN-1", "SW-TRAIN-4")
def test_linen_and_nnx_models_train_alike():
    """SW-TRAIN-1, SW-TRAIN-4: the same LM as an unmodified Linen and NNX model (same weights)
    trains through `from_linen` / `from_nnx`: equal losses and adapters after 4 adamw steps
    (1e-5 (1 + max|p|)), a lower loss than at the start, and the scales unchanged."""
    module = LinenLM()
    example = jnp.ones((1, 5), jnp.int32)
    variables = module.init(jax.random.key(0), example)
    lms = [
        train.from_linen(module, variables, example),
        train.from_nnx(NnxLM(variables["params"])),
    ]
    assert lms[0].shapes == lms[1].shapes == {"hidden": (DIM, DIM), "head": (DIM, VOCAB)}
    cfg = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["hidden", "head"])
    ad = jaxlora.init_adapter(jax.random.key(1), cfg, lms[0].shapes)
    opt = optax.adamw(5e-2)
    rng = np.random.default_rng(0)
    batch = train.make_batch([([], rng.integers(0, VOCAB, 6).tolist()) for _ in range(4)], length=6)
    runs = []
    for lm in lms:
        step, state = train.make_step(opt, lm.logits, dropout=0.1), train.init(opt, ad)
        losses = []
        for i in range(4):
            state, metrics = step(state, lm.base, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        runs.append((losses, train.adapter_of(state)))
    (l0, a0), (l1, a1) = runs
    assert np.allclose(l0, l1, rtol=1e-5) and l0[-1] < l0[0]
    for path in ad:
        for f in ("a", "b"):
            p, q = np.asarray(getattr(a0[path], f)), np.asarray(getattr(a1[path], f))
            assert np.max(np.abs(p - q)) <= 1e-5 * (1 + np.max(np.abs(p)))
        assert float(a0[path].scale) == float(a1[path].scale) == 2.0
