"""One selection argument for every integration (SW-SEAM-1): the spec chain, Linen, NNX and the
Llama take the same `lora=` / `routing=` and agree with the oracle.

Each test draws a selection of one of three kinds — one adapter, several adapters (their deltas
summed), a routed mixed batch with base rows — plus the base model through the bank's structure
(SW-ACTIVE-4), and a routing kernel; the selection object is built once and passed unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxlora
from jaxlora import reference
from jaxlora.flax import linen as lora_linen
from jaxlora.flax import nnx as lora_nnx
from jaxlora.models import Llama, LlamaConfig
from jaxlora.models import forward as llama_forward
from jaxlora.routing import ROUTINGS
from tests.strategies import cases

F32 = (("float32", "float32"),)
KINDS = ("one", "several", "base", "routed")


@st.composite
def selections(draw: st.DrawFn, names: tuple[str, ...], batch: int):
    """`(kind, value)`: a name, a list of distinct names, None, or one name-or-None per row."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "one":
        return kind, draw(st.sampled_from(names))
    if kind == "several":
        return kind, draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    if kind == "base":
        return kind, None
    rows = draw(st.lists(st.sampled_from((*names, None)), min_size=batch, max_size=batch))
    return kind, rows


def build_lora(bank: jaxlora.AdapterBank, kind: str, value):
    """The one `lora=` value for a drawn selection (the bank is conformed first)."""
    conformed = jaxlora.conform(bank)
    if kind == "routed":
        return jaxlora.stack(conformed).route(value)
    return jaxlora.select(conformed, value)


def oracle(case, kind: str, value, layers=None) -> np.ndarray:
    layers = case.layers if layers is None else layers
    if kind == "routed":
        rows = [None if n is None else case.adapters[n].ref for n in value]
        return reference.mixed_forward(layers, case.x64, rows)
    return reference.chain_forward(layers, case.x64, case.refs(value))


def renamed(bank: jaxlora.AdapterBank, mapping: dict[str, str]) -> jaxlora.AdapterBank:
    """The bank with every layer path renamed (the chain's paths -> a Flax model's paths)."""
    return jaxlora.AdapterBank(
        {n: {mapping[p]: w for p, w in ad.items()} for n, ad in bank.items()}
    )


def assert_close(y, want):
    ok, err, allowed = reference.allclose(np.asarray(y), want, "float32")
    assert ok, (err, allowed)


@pytest.mark.clause("SW-SEAM-1", "SW-FORWARD-1", "SW-MIXED-1", "SW-ACTIVE-4")
@given(cases(dtype_pairs=F32, max_adapters=3), st.data(), st.sampled_from(ROUTINGS))
def test_spec_chain_takes_every_selection_kind(case, data, routing):
    """SW-SEAM-1, SW-FORWARD-1: `jaxlora.forward(model, x, lora=..., routing=...)` equals the
    oracle for one adapter, several, the base model through the bank's structure
    (SW-ACTIVE-4) and a routed batch with base rows (SW-MIXED-1)."""
    kind, value = data.draw(selections(case.names, case.x.shape[0]))
    lora = build_lora(case.bank, kind, value)
    y = jax.jit(jaxlora.forward, static_argnames="routing")(
        case.model, case.x, lora=lora, routing=routing
    )
    assert_close(y, oracle(case, kind, value))


class LinenChain(nn.Module):
    """The spec chain as a Linen model: `Dense` layers `layers_<i>`, tanh between them."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        last = len(self.widths) - 2
        for i, width in enumerate(self.widths[1:]):
            x = nn.Dense(width, name=f"layers_{i}")(x)
            if i < last:
                x = jnp.tanh(x)
        return x


def widths_of(case) -> tuple[int, ...]:
    kernels = case.model.kernels
    return (int(kernels[0].shape[0]), *(int(k.shape[1]) for k in kernels))


@pytest.mark.clause("SW-SEAM-1", "SW-FLAX-1", "SW-FLAX-4")
@given(cases(dtype_pairs=F32, max_adapters=3), st.data(), st.sampled_from(ROUTINGS))
def test_linen_takes_every_selection_kind(case, data, routing):
    """SW-SEAM-1, SW-FLAX-1, SW-FLAX-4: an unmodified Linen model with the chain's weights takes
    the same `lora=` values (paths renamed to `layers_<i>`) and equals the oracle."""
    kind, value = data.draw(selections(case.names, case.x.shape[0]))
    mapping = {p: f"layers_{i}" for i, p in enumerate(case.model.paths)}
    params = {
        mapping[p]: {"kernel": k, "bias": b}
        for p, k, b in zip(case.model.paths, case.model.kernels, case.model.biases, strict=True)
    }
    lora = build_lora(renamed(case.bank, mapping), kind, value)
    fwd = jax.jit(
        lambda v, x, sel: lora_linen.apply(
            LinenChain(widths_of(case)), v, x, lora=sel, routing=routing
        )
    )
    assert_close(fwd({"params": params}, case.x, lora), oracle(case, kind, value))


class NnxChain(nnx.Module):
    """The spec chain as an NNX model: `layers` is an `nnx.List` of `nnx.Linear`."""

    def __init__(self, kernels, biases):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(k.shape[0], k.shape[1], rngs=rngs) for k in kernels])
        for layer, k, b in zip(self.layers, kernels, biases, strict=True):
            layer.kernel[...] = k
            layer.bias[...] = b

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jnp.tanh(x)
        return x


@pytest.mark.clause("SW-SEAM-1", "SW-FLAX-1", "SW-FLAX-4")
@given(cases(dtype_pairs=F32, max_adapters=3), st.data(), st.sampled_from(ROUTINGS))
def test_nnx_takes_every_selection_kind(case, data, routing):
    """SW-SEAM-1, SW-FLAX-1, SW-FLAX-4: an unmodified NNX model (layers in an `nnx.List`) takes
    the same `lora=` values (paths renamed to `layers.<i>`) and equals the oracle."""
    kind, value = data.draw(selections(case.names, case.x.shape[0]))
    mapping = {p: f"layers.{i}" for i, p in enumerate(case.model.paths)}
    model = NnxChain(case.model.kernels, case.model.biases)
    graphdef, state = nnx.split(model)
    lora = build_lora(renamed(case.bank, mapping), kind, value)
    fwd = jax.jit(
        lambda s, x, sel: lora_nnx.apply(nnx.merge(graphdef, s), x, lora=sel, routing=routing)
    )
    assert_close(fwd(state, case.x, lora), oracle(case, kind, value))


LLAMA = LlamaConfig(64, 16, 32, 2, 4, 2, 4)
LLAMA_TARGETS = (["q_proj", "v_proj"], ["o_proj", "down_proj"], ["q_proj", "up_proj"])
TOKENS = np.asarray([[5, 9, 2, 7], [1, 3, 3, 8], [4, 4, 6, 2]], np.int32)


@st.composite
def llama_banks(draw: st.DrawFn, shapes) -> jaxlora.AdapterBank:
    bank = jaxlora.AdapterBank()
    for i in range(draw(st.integers(1, 3))):
        cfg = jaxlora.LoraConfig(
            r=draw(st.sampled_from((1, 2, 4))),
            lora_alpha=draw(st.sampled_from((1.0, 8.0))),
            target_modules=draw(st.sampled_from(LLAMA_TARGETS)),
            init_lora_weights=False,
        )
        key = jax.random.key(draw(st.integers(0, 2**16)))
        bank = bank.add(f"ad{i}", jaxlora.init_adapter(key, cfg, shapes))
    return bank


def llama_oracle_row(model: Llama, adapters, row: int) -> np.ndarray:
    """The oracle's SW-FORWARD-1 for the Llama: every projection `W + sum s_i A_i B_i` in float64
    (reference.merge), cast once, then the base model on that row."""
    kernels = {}
    for _, module in nnx.iter_modules(model):
        path = getattr(module, "lora_path", None)
        if path is None:
            continue
        w = np.asarray(module.kernel[...], np.float64)
        for ad in adapters:
            if path in ad:
                a = np.asarray(ad[path].a, np.float64)
                b = np.asarray(ad[path].b, np.float64)
                w = w + float(ad[path].scale) * (a @ b)
        kernels[path] = w
    merged = jaxlora.with_kernels(
        model, {p: jnp.asarray(k, jnp.float32) for p, k in kernels.items()}
    )
    return np.asarray(llama_forward(merged, TOKENS[row : row + 1]))


@pytest.mark.clause("SW-SEAM-1", "SW-LLAMA-3", "SW-LLAMA-4", "SW-ACTIVE-4")
@settings(max_examples=max(4, settings.default.max_examples // 3))  # each example compiles
@given(st.data(), st.sampled_from(ROUTINGS))
def test_llama_takes_every_selection_kind(data, routing):
    """SW-SEAM-1, SW-LLAMA-3, SW-LLAMA-4: `jaxlora.models.forward(model, tokens, lora=...,
    routing=...)` equals, row by row, the base Llama whose projections hold the oracle's
    float64 `W + sum s A B` for that row's adapters (one, several, routed, and none through the
    bank's structure, SW-ACTIVE-4)."""
    model = Llama.random(LLAMA, seed=3)
    bank = data.draw(llama_banks(model.lora_shapes()))
    kind, value = data.draw(selections(bank.names, TOKENS.shape[0]))
    lora = build_lora(bank, kind, value)
    logits = np.asarray(llama_forward(model, TOKENS, lora=lora, routing=routing))
    for row in range(TOKENS.shape[0]):
        if kind == "routed":
            names = [] if value[row] is None else [value[row]]
        elif kind == "one":
            names = [value]
        else:
            names = [] if value is None else list(value)
        want = llama_oracle_row(model, [bank[n] for n in names], row)
        assert_close(logits[row : row + 1], want)


@pytest.mark.clause("SW-SEAM-1")
@pytest.mark.parametrize(
    "bad, hint",
    [
        ((), "a tuple or list of adapters is not accepted"),
        ("ad0", "use jaxlora.select(bank, 'ad0')"),
        (3, "got int"),
    ],
)
def test_other_lora_values_are_refused_naming_the_forms(bad, hint):
    """SW-SEAM-1: anything but a selection, one adapter or None is a ConfigError that lists the
    accepted forms, for every integration."""
    model = jaxlora.DenseChain.init(jax.random.key(0), ["l0"], [2, 2])
    x = jnp.ones((1, 2))
    calls = [
        lambda: jaxlora.forward(model, x, lora=bad),
        lambda: lora_nnx.apply(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x, lora=bad),
        lambda: llama_forward(Llama.random(LLAMA), TOKENS, lora=bad),
    ]
    for call in calls:
        with pytest.raises(jaxlora.errors.ConfigError, match="`lora=` takes") as err:
            call()
        assert hint in str(err.value)
