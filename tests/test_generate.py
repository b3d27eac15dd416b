"""Batch generation with per-row adapters (specs/model.md, SW-GEN-*)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from hf_fixtures import (  # noqa: E402
    ADAPTERS,
    CONFIG,
    PROMPTS,
    ROWS,
    write_llama_checkpoint,
    write_peft_adapters,
)

import jaxlora  # noqa: E402
from jaxlora.engine.steps import for_model  # noqa: E402
from jaxlora.errors import AdapterNotFoundError, ConfigError, ShapeMismatchError  # noqa: E402
from jaxlora.generate import compile_counts, generate  # noqa: E402
from jaxlora.models import forward, load_llama  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    base = write_llama_checkpoint(root / "llama", seed=11, **CONFIG)
    peft_model = write_peft_adapters(base, root / "adapters", ADAPTERS, seed=12)
    model = load_llama(root / "llama")
    bank = jaxlora.io.load_peft(root / "adapters", layer_shapes=model.lora_shapes())
    conformed = jaxlora.conform(bank)
    return peft_model, model, conformed, jaxlora.stack(conformed)


def _left_padded(prompts):
    width = max(map(len, prompts))
    ids = np.array([[PAD] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.clause("SW-GEN-2")
def test_greedy_matches_transformers_peft_generate(setup):
    """SW-GEN-2: per-row tokens equal PEFT generate(adapter_names=...) with the same stop."""
    peft_model, model, _, stacked = setup
    ids, mask = _left_padded(PROMPTS)
    with torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            adapter_names=[r or "__base__" for r in ROWS],
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=PAD,
        )
    theirs = out[:, ids.shape[1] :].numpy()
    lora = stacked.route(ROWS)
    ours = generate(model, PROMPTS, lora=lora, max_new_tokens=10, stop_tokens=[2], pad_id=PAD)
    for i, row in enumerate(ours.rows()):
        expected = theirs[i].tolist()
        if 2 in expected:
            expected = expected[: expected.index(2) + 1]
        assert row == expected, f"row {i} ({ROWS[i]})"


@pytest.mark.clause("SW-GEN-1")
def test_rows_equal_their_single_adapter_generation(setup):
    """SW-GEN-1: a mixed batch row equals the row generated alone via jaxlora.select."""
    _, model, conformed, stacked = setup
    mixed = generate(model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=8)
    for i, (prompt, name) in enumerate(zip(PROMPTS, ROWS, strict=True)):
        alone = generate(model, [prompt], lora=jaxlora.select(conformed, name), max_new_tokens=8)
        assert alone.rows()[0] == mixed.rows()[i], f"row {i} ({name})"
    assert mixed.tokens.shape == (len(PROMPTS), 8) and mixed.prompt_len == 4


@pytest.mark.clause("SW-GEN-3")
def test_per_row_stop_tokens(setup):
    """SW-GEN-3: each row stops at its first stop token, kept; pad_id after; lengths count it."""
    _, model, _, stacked = setup
    lora = stacked.route(ROWS)
    free = generate(model, PROMPTS, lora=lora, max_new_tokens=8, pad_id=PAD).tokens
    stops = [[int(row[k])] for row, k in zip(free, [3, 0, 5, 2, 7], strict=True)]
    stopped = generate(model, PROMPTS, lora=lora, max_new_tokens=8, stop_tokens=stops, pad_id=PAD)
    for i, row in enumerate(free.tolist()):
        n = row.index(stops[i][0]) + 1
        assert stopped.lengths[i] == n
        assert stopped.tokens[i, :n].tolist() == row[:n]
        assert (stopped.tokens[i, n:] == PAD).all()
    flat = generate(model, PROMPTS, lora=lora, max_new_tokens=8, stop_tokens=[int(free[0, 1])])
    assert flat.rows()[0] == free[0, : free[0].tolist().index(free[0, 1]) + 1].tolist()


@pytest.mark.clause("SW-GEN-4")
def test_sampling_is_keyed_and_respects_top_k(setup):
    """SW-GEN-4: same key -> same tokens; top_k=1 is greedy; samples lie in the top k."""
    _, model, conformed, stacked = setup
    key = jax.random.key(3)
    kwargs = dict(lora=stacked.route(ROWS), max_new_tokens=8, temperature=1.5, top_k=3, key=key)
    a = generate(model, PROMPTS, **kwargs)
    b = generate(model, PROMPTS, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    greedy = generate(model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=8)
    top1 = generate(model, PROMPTS, **(kwargs | {"top_k": 1}))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    for i in (0, 2):  # every prefix of the sampled row in one left-padded forward
        prefixes = [PROMPTS[i] + a.tokens[i, :t].tolist() for t in range(8)]
        ids, mask = _left_padded(prefixes)
        lora = jaxlora.select(conformed, ROWS[i])
        last = np.asarray(forward(model, ids, attention_mask=mask, lora=lora))[:, -1]
        for t, token in enumerate(a.tokens[i]):
            assert token in np.argsort(last[t])[-3:], f"row {i} step {t}: {token} not in top 3"
    for bad, words in [
        (dict(temperature=1.0), "explicit `key"),
        (dict(temperature=-1.0, key=key), "finite number >= 0, got -1.0"),
        (dict(top_k=0), "`top_k` must be in"),
    ]:
        with pytest.raises(ConfigError, match=words):
            generate(model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=2, **bad)


@pytest.mark.clause("SW-GEN-5")
def test_switching_adapters_never_retraces(setup):
    """SW-GEN-5: new adapter assignments (and prompts of one padded length, and fewer new
    tokens within the same cache length) reuse one decode."""
    _, model, _, stacked = setup
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    decode = for_model(nnx.split(model)[0]).decode  # the engine's step for this model
    own, before = decode._cache_size(), compile_counts()
    for rows in (["wide", "ffn", None], [None, None, "default"], ["ffn", "wide", "wide"]):
        generate(model, prompts, lora=stacked.route(rows), max_new_tokens=7)
    generate(model, [[9, 9, 9], [1], [3, 3]], lora=stacked.route(["default"] * 3), max_new_tokens=7)
    # fewer new tokens, the same cache length (3 + 5 and 3 + 7 both round up to 32 slots)
    generate(model, prompts, lora=stacked.route(["ffn", None, "wide"]), max_new_tokens=5)
    after = compile_counts()
    assert after["decode"] - before["decode"] == 1
    assert after["prefill"] - before["prefill"] == 1
    assert decode._cache_size() - own == after["decode"] - before["decode"]


@pytest.mark.clause("SW-GEN-6")
def test_generation_input_errors(setup):
    """SW-GEN-6: bad adapters lists (one id per row, else ShapeMismatchError), names (when the
    selection is built), prompts and lengths raise clear errors."""
    _, model, conformed, stacked = setup
    cases = [
        (
            dict(adapters=["wide"]),
            ShapeMismatchError,
            r"Routed ids have shape \(1,\) but the batch has 5 rows",
        ),
        (
            dict(adapters=["wide", "nope", None, None, None]),
            AdapterNotFoundError,
            r"'nope'.*Slots: 'default', 'ffn', 'wide'",
        ),
        (dict(adapters="nope"), AdapterNotFoundError, r"'nope'.*'default', 'ffn', 'wide'"),
        (dict(prompts=[[1], []]), ConfigError, "prompt 1 is empty"),
        (dict(prompts=[[1, 80]]), ConfigError, r"token id 80 outside the vocabulary \[0, 80\)"),
        (dict(max_new_tokens=0), ConfigError, "`max_new_tokens` must be a positive int"),
        (dict(stop_tokens=[[2], [3]]), ConfigError, "`stop_tokens` has 2 per-row lists"),
    ]
    for changes, error, words in cases:
        args = dict(prompts=PROMPTS, adapters=ROWS, max_new_tokens=2) | changes
        with pytest.raises(error, match=words):
            rows = args.pop("adapters")
            lora = jaxlora.select(conformed, rows) if isinstance(rows, str) else stacked.route(rows)
            generate(model, args.pop("prompts"), lora=lora, **args)


@pytest.mark.clause("SW-GEN-4")
@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_temperature_is_refused(setup, temperature):
    """SW-GEN-4: a NaN or infinite temperature raises ConfigError instead of sampling garbage."""
    _, model, _, stacked = setup
    with pytest.raises(ConfigError, match=r"`temperature` must be a finite number >= 0, got"):
        generate(
            model, PROMPTS, lora=stacked.route(ROWS), max_new_tokens=2, temperature=temperature,
            key=jax.random.key(0),
        )  # fmt: skip
