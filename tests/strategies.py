"""Shared Hypothesis strategies for the core tests: a random model, bank, active set and input,
built twice from the same numbers: once for jaxlora (JAX arrays) and once for the NumPy oracle
(`jaxlora.reference`, float64 copies of the values *after* their cast to the JAX dtypes, as
SW-TOL-1 asks).

Shapes come from small fixed sets so that compiled kernels are reused across examples.

Example:
    >>> from hypothesis import given
    >>> @given(cases())
    ... def test(case):
    ...     assert case.names
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

import jaxlora
from jaxlora import reference

#: model layouts (paths in application order); suffixes "q", "v", "head" occur in all of them
LAYOUTS = (
    ("blocks.0.q", "blocks.0.v", "head"),
    ("blocks.0.q", "blocks.0.v", "blocks.1.q", "blocks.1.v", "head"),
)
#: layer widths per layout (few distinct shapes, so compiled kernels are reused)
WIDTHS = {3: ((8, 16, 8, 4), (4, 4, 8, 16)), 5: ((8, 16, 8, 16, 8, 4), (4, 8, 8, 4, 16, 8))}
RANKS = (1, 2, 3, 8, 16, 64)
ALPHAS = (0.5, 1.0, 8.0, 16.0, 32.0)
TARGET_LISTS = (("q",), ("v",), ("head",), ("q", "v"), ("blocks.1.q", "head"), ("q", "v", "head"))
TARGET_REGEXES = (r"blocks\.0\..*", r".*\.q", r"head|blocks\.1\.v", "all-linear", r"blocks\.\d\.v")
EXCLUDES = (None, None, None, ("head",), r"blocks\.0\.q")
PATTERN_KEYS = ("q", "v", r"blocks\.1\.q", "head", r"blocks\.0\..*", "0.v")
#: (base dtype, adapter dtype) pairs: SW-DTYPE-1 asks for bf16 base with fp32 adapters too
DTYPE_PAIRS = (
    ("float32", "float32"),
    ("bfloat16", "bfloat16"),
    ("bfloat16", "float32"),
    ("float32", "bfloat16"),
)


def cast(values: np.ndarray, dtype: str) -> tuple[jnp.ndarray, np.ndarray]:
    """`values` as a JAX array of `dtype`, and the float64 NumPy copy of the cast values."""
    arr = jnp.asarray(np.asarray(values, np.float32), dtype=dtype)
    return arr, np.asarray(arr.astype(jnp.float32), np.float64)


@dataclasses.dataclass
class AdapterCase:
    """One adapter in both worlds."""

    config: jaxlora.LoraConfig
    adapter: dict[str, jaxlora.LoraWeights]
    ref: reference.RefAdapter


@dataclasses.dataclass
class Case:
    """A model, a bank and an input, for jaxlora and for the oracle."""

    base_dtype: str
    adapter_dtype: str
    model: jaxlora.DenseChain
    layers: list[tuple[str, np.ndarray, np.ndarray]]  # float64 oracle copy
    x: jnp.ndarray
    x64: np.ndarray
    adapters: dict[str, AdapterCase]
    rng: Any

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    @property
    def bank(self) -> jaxlora.AdapterBank:
        return jaxlora.AdapterBank({n: a.adapter for n, a in self.adapters.items()})

    def refs(self, active: str | list[str] | None) -> list[reference.RefAdapter]:
        if active is None:
            return []
        if isinstance(active, str):
            return [self.adapters[active].ref]
        return [self.adapters[n].ref for n in active]

    def oracle(self, active: str | list[str] | None) -> np.ndarray:
        return reference.chain_forward(self.layers, self.x64, self.refs(active))

    def check(self, y: Any, active: str | list[str] | None) -> tuple[bool, float, float]:
        """SW-TOL-1 comparison of a jaxlora output with the oracle."""
        assert str(y.dtype) == self.base_dtype, (y.dtype, self.base_dtype)
        return reference.allclose(np.asarray(y.astype(jnp.float32)), self.oracle(active), y.dtype)


@st.composite
def configs(draw: st.DrawFn, rank: int | None = None) -> dict[str, Any]:
    """Keyword arguments of a `LoraConfig` (and of the matching `RefAdapter`); with `rank`, every
    layer gets that rank (no rank_pattern)."""
    if draw(st.booleans()):
        targets: Any = list(draw(st.sampled_from(TARGET_LISTS)))
    else:
        targets = draw(st.sampled_from(TARGET_REGEXES))
    keys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=0 if rank else 2, unique=True))
    akeys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=2, unique=True))
    return dict(
        r=rank or draw(st.sampled_from(RANKS)),
        lora_alpha=draw(st.sampled_from(ALPHAS)),
        use_rslora=draw(st.booleans()),
        target_modules=targets,
        exclude_modules=draw(st.sampled_from(EXCLUDES)),
        rank_pattern={k: draw(st.sampled_from(RANKS)) for k in keys},
        alpha_pattern={k: draw(st.sampled_from(ALPHAS)) for k in akeys},
    )


def build_adapter(
    rng: np.random.Generator, kwargs: dict[str, Any], shapes: dict[str, tuple[int, int]], dtype
) -> AdapterCase:
    """Random factors for the layers `kwargs` targets (ranks resolved by the oracle's rules)."""
    ref_targets = reference.targets(kwargs["target_modules"], shapes, kwargs["exclude_modules"])
    assume(ref_targets)
    probe = reference.RefAdapter(
        r=kwargs["r"],
        lora_alpha=kwargs["lora_alpha"],
        weights={},
        rank_pattern=kwargs["rank_pattern"],
        alpha_pattern=kwargs["alpha_pattern"],
    )
    factors, ref_weights = {}, {}
    for path in ref_targets:
        d_in, d_out = shapes[path]
        r = probe.rank_at(path)
        a, a64 = cast(rng.uniform(-1, 1, (d_in, r)) / np.sqrt(d_in), dtype)
        b, b64 = cast(rng.normal(0, 1, (r, d_out)) / np.sqrt(r), dtype)
        factors[path] = (a, b)
        ref_weights[path] = (a64, b64)
    config = jaxlora.LoraConfig(**kwargs)
    ref = reference.RefAdapter(weights=ref_weights, **kwargs_for_ref(kwargs))
    return AdapterCase(config, jaxlora.make_adapter(config, factors, dtype=dtype), ref)


def kwargs_for_ref(kwargs: dict[str, Any]) -> dict[str, Any]:
    keep = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")
    return {k: kwargs[k] for k in keep}


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    max_adapters: int = 4,
    dtype_pairs: tuple[tuple[str, str], ...] = DTYPE_PAIRS,
    batch: int = 3,
    same_rank: bool = False,
) -> Case:
    """A random model (one of `LAYOUTS` with widths from `WIDTHS`), bank and input; with
    `same_rank`, every adapter has one rank at every layer."""
    base_dtype, adapter_dtype = draw(st.sampled_from(dtype_pairs))
    paths = draw(st.sampled_from(LAYOUTS))
    widths = draw(st.sampled_from(WIDTHS[len(paths)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    layers, layers64 = {}, []
    for i, path in enumerate(paths):
        bound = 1.0 / np.sqrt(widths[i])
        w, w64 = cast(rng.uniform(-bound, bound, (widths[i], widths[i + 1])), base_dtype)
        c, c64 = cast(rng.uniform(-bound, bound, (widths[i + 1],)), base_dtype)
        layers[path] = (w, c)
        layers64.append((path, w64, c64))
    model = jaxlora.DenseChain.from_layers(layers)
    shapes = model.layer_shapes()
    n = draw(st.integers(1, max_adapters))
    rank = draw(st.sampled_from(RANKS)) if same_rank else None
    adapters = {
        f"ad{i}": build_adapter(rng, draw(configs(rank)), shapes, adapter_dtype) for i in range(n)
    }
    x, x64 = cast(rng.normal(0, 1, (batch, widths[0])), base_dtype)
    return Case(base_dtype, adapter_dtype, model, layers64, x, x64, adapters, rng)


def active_sets(names: tuple[str, ...]) -> st.SearchStrategy:
    """SW-ACTIVE-1: one name, an ordered list of distinct names, or none (`None` / `[]`)."""
    return st.one_of(
        st.sampled_from(names),
        st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True),
        st.sampled_from([None, []]),
    )
