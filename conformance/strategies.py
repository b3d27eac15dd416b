"""Hypothesis strategies for the suite: base models (SW-MODEL-1), adapters, inputs and dtypes.

Cases are small frozen dataclasses with a short `repr` (what a failure report prints as the
shrunk counterexample); the NumPy arrays are derived from a seed, so a case stays readable.
Values are rounded to the case's dtype before any driver or the oracle sees them (SW-TOL-1: the
oracle computes in float64 from the very values the implementation holds). Layouts, pattern
keys, target rules and adapter names come from `conformance.world` (adversarial on purpose).

Some parts of the world are *features* that attribution (`conformance.attribution`) can switch
off to see whether a failure needs them: the capabilities "rslora", "patterns", "multi_active",
"mixed", "merge", "combine_cat" (removed from the driver's view), and "scaled" (alpha != r),
"layouts" (colliding paths) and "names" (non-identifier adapter names), see `on`.

Example:
    >>> spec = AdapterSpec(rank=2, alpha=4.0, targets=(0,))
    >>> layers = make_layers(SIMPLE_PRESETS[0], seed=0, dtype="float32")
    >>> [p for p, _, _ in layers]
    ['blocks.0.q', 'blocks.0.o']
    >>> spec.build(layers, seed=1, dtype="float32").scale_at("blocks.0.q")
    2.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

from jaxlora.reference import RefAdapter

from .driver import Layers
from .world import (
    LAYOUT_PRESETS,
    SIMPLE_PRESETS,
    Layout,
    few_shapes,
    free_layouts,
    pattern_keys,
)

__all__ = [
    "ALPHAS",
    "PSEUDO_FEATURES",
    "RANKS",
    "SIMPLE_PRESETS",
    "AdapterSpec",
    "Layout",
    "Scenario",
    "adapter_specs",
    "layouts",
    "make_inputs",
    "make_layers",
    "on",
    "precise_dtype",
    "round_to",
    "scenarios",
    "supported_dtypes",
]

RANKS = (1, 2, 4)
ALPHAS = (1.0, 2.0, 3.0, 8.0, 16.0)
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")
#: Parts of the generated world that are not capabilities but can be switched off.
PSEUDO_FEATURES = frozenset({"scaled", "layouts", "names"})


def on(driver, feature: str) -> bool:
    """Whether `feature` is part of the world drawn for `driver`: a capability it declares, or
    a pseudo-feature not listed in its `suite_features_off` (set by attribution re-runs)."""
    if feature in getattr(driver, "suite_features_off", ()):
        return False
    return feature in PSEUDO_FEATURES or feature in driver.capabilities


def supported_dtypes(driver) -> list[str]:
    """The float dtypes `driver` declares (`"dtype:<name>"` capabilities), widest first."""
    return [d for d in FLOAT_DTYPES if f"dtype:{d}" in driver.capabilities]


def precise_dtype(driver) -> str:
    """float64 when the driver has it, else float32: the dtype of the semantic checks."""
    dtypes = supported_dtypes(driver)
    for d in ("float64", "float32"):
        if d in dtypes:
            return d
    if not dtypes:
        raise ValueError(f"driver {driver.name!r} declares no dtype:<name> capability.")
    return dtypes[0]


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` and returned as float64 (exactly representable in `dtype`)."""
    if dtype == "bfloat16":
        import ml_dtypes  # only for bfloat16; ships with JAX

        return np.asarray(values).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(values).astype(dtype).astype(np.float64)


def make_layers(layout: Layout, seed: int, dtype: str) -> Layers:
    """Random base layers for `layout` (SW-MODEL-1), rounded to `dtype`."""
    rng = np.random.default_rng([seed, 0])
    layers = []
    widths = layout.widths
    for path, d_in, d_out in zip(layout.paths, widths, widths[1:], strict=False):
        w = rng.uniform(-1, 1, (d_in, d_out)) / np.sqrt(d_in)
        c = rng.uniform(-0.5, 0.5, d_out)
        layers.append((path, round_to(w, dtype), round_to(c, dtype)))
    return layers


def make_inputs(width: int, batch: int, seed: int, dtype: str) -> np.ndarray:
    """An input batch `[batch, width]`, rounded to `dtype`."""
    return round_to(np.random.default_rng([seed, 1]).normal(size=(batch, width)), dtype)


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """The shape of an adapter; `build` fills in the arrays for a model.

    Arguments:
        rank, alpha, rslora: `r`, `lora_alpha`, `use_rslora`.
        targets: indices of the targeted layers (kept if < the model's layer count).
        rank_pattern, alpha_pattern: `(key, value)` pairs in pattern order (SW-SCALE-3).
    """

    rank: int
    alpha: float
    targets: tuple[int, ...]
    rslora: bool = False
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def __repr__(self) -> str:
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("rslora", self.rslora),
                ("rank_pattern", dict(self.rank_pattern)),
                ("alpha_pattern", dict(self.alpha_pattern)),
            )
            if v
        )
        return f"Adapter(r={self.rank}, alpha={self.alpha:g}, targets={self.targets}{extra})"

    def paths(self, layers: Layers) -> list[str]:
        """The targeted paths in this model (at least the first layer)."""
        chosen = [layers[i][0] for i in sorted(set(self.targets)) if i < len(layers)]
        return chosen or [layers[0][0]]

    def config(self) -> RefAdapter:
        """The config alone (no weights)."""
        return RefAdapter(
            r=self.rank,
            lora_alpha=float(self.alpha),
            weights={},
            use_rslora=self.rslora,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern=dict(self.alpha_pattern),
        )

    def build(
        self,
        layers: Layers,
        seed: int,
        dtype: str,
        *,
        pad_rank: int = 0,
        zero_layers: bool = False,
    ) -> RefAdapter:
        """The `RefAdapter` with random A/B (B nonzero) rounded to `dtype`."""
        rng = np.random.default_rng([seed, 2])
        ad = self.config()
        targeted = self.paths(layers)
        for path, w, _ in layers:
            d_in, d_out = w.shape
            r = ad.rank_at(path)
            if path in targeted:
                a = round_to(rng.normal(size=(d_in, r)) / np.sqrt(d_in), dtype)
                b = round_to(rng.normal(size=(r, d_out)), dtype)
            elif zero_layers:
                a, b = np.zeros((d_in, r)), np.zeros((r, d_out))
            else:
                continue
            if pad_rank:
                a = np.pad(a, ((0, 0), (0, pad_rank)))
                b = np.pad(b, ((0, pad_rank), (0, 0)))
            ad.weights[path] = (a, b)
        if pad_rank:
            ad = padded_config(ad, pad_rank)
        return ad


def padded_config(ad: RefAdapter, extra: int) -> RefAdapter:
    """The config of `ad` with every rank raised by `extra` and alpha raised to keep the scale."""
    if ad.rank_pattern or ad.alpha_pattern:
        raise ValueError("padded_config supports adapters without rank/alpha patterns.")
    r = ad.r + extra
    ratio = np.sqrt(r / ad.r) if ad.use_rslora else r / ad.r
    return dataclasses.replace(ad, r=r, lora_alpha=float(ad.lora_alpha * ratio))


def layouts(driver) -> st.SearchStrategy[Layout]:
    """Model layouts for `driver`: `SIMPLE_PRESETS` when "layouts" is off, `LAYOUT_PRESETS` for
    drivers that compile per shape, else those or free layouts of up to 8 layers."""
    if not on(driver, "layouts"):
        return st.sampled_from(SIMPLE_PRESETS)
    if few_shapes(driver):
        return st.sampled_from(LAYOUT_PRESETS)
    return st.one_of(st.sampled_from(LAYOUT_PRESETS), free_layouts())


@st.composite
def _patterns(draw, paths: Sequence[str], values: Sequence, min_size: int = 0) -> tuple:
    """Up to 3 keys, each derived from a drawn path (so several keys often match one path, in
    either order), with distinct values (so the first-match rule is observable)."""
    n = draw(st.integers(min_size, 3))
    keys: list[str] = []
    for _ in range(n):
        path = draw(st.sampled_from(list(paths)))
        key = draw(st.sampled_from(pattern_keys([path])))
        if key not in keys:
            keys.append(key)
    chosen = draw(st.permutations(list(values)))
    return tuple(zip(keys, chosen, strict=False))


def adapter_specs(
    driver,
    paths: Sequence[str],
    *,
    ranks: tuple[int, ...] = RANKS,
    rslora: bool | None = None,
    patterns: bool | None = None,
) -> st.SearchStrategy[AdapterSpec]:
    """Adapters for a model with `paths`: rank, alpha, targets; rsLoRA and patterns when the
    driver declares them.

    Arguments:
        driver: its capabilities (and features, `on`) decide what is drawn when not forced.
        paths: the model's layer paths (targets are indices into them; keys derive from them).
        ranks: the ranks to draw from.
        rslora, patterns: force on (True) or off (False); None: draw when supported.
    """
    alphas: Sequence[float] = ALPHAS
    if not on(driver, "scaled"):  # every scale is 1
        ranks, alphas = (1,), (1.0,)
    rs = st.just(rslora) if rslora is not None else st.booleans() if on(driver, "rslora") else None
    use_patterns = patterns if patterns is not None else on(driver, "patterns")
    empty = st.just(())
    return st.builds(
        AdapterSpec,
        rank=st.sampled_from(ranks),
        alpha=st.sampled_from(alphas),
        targets=st.lists(
            st.integers(0, len(paths) - 1), min_size=1, max_size=len(paths), unique=True
        ).map(lambda t: tuple(sorted(t))),
        rslora=rs if rs is not None else st.just(False),
        rank_pattern=_patterns(paths, ranks, 1 if patterns else 0) if use_patterns else empty,
        alpha_pattern=_patterns(paths, alphas) if use_patterns else empty,
    )


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A model, some adapters named `a0, a1, ...`, an input batch and a dtype, from one seed.

    Example:
        >>> sc = Scenario(SIMPLE_PRESETS[0], (AdapterSpec(1, 2.0, (1,)),), batch=2, dtype="float64",
        ...               seed=0)
        >>> sc.x().shape, sorted(sc.adapters_by_name())
        ((2, 4), ['a0'])
    """

    layout: Layout
    adapters: tuple[AdapterSpec, ...]
    batch: int
    dtype: str
    seed: int

    def __repr__(self) -> str:
        return (
            f"Scenario(paths={self.layout.paths}, widths={self.layout.widths}, "
            f"adapters={list(self.adapters)}, batch={self.batch}, dtype={self.dtype!r}, "
            f"seed={self.seed})"
        )

    @property
    def widths(self) -> tuple[int, ...]:
        return self.layout.widths

    def layers(self) -> Layers:
        return make_layers(self.layout, self.seed, self.dtype)

    def names(self) -> list[str]:
        return [f"a{i}" for i in range(len(self.adapters))]

    def adapter(self, i: int, **kwargs) -> RefAdapter:
        """Adapter `i` (see `AdapterSpec.build` for `pad_rank` / `zero_layers`)."""
        return self.adapters[i].build(self.layers(), self.seed * 31 + i, self.dtype, **kwargs)

    def adapters_by_name(self) -> dict[str, RefAdapter]:
        return {n: self.adapter(i) for i, n in enumerate(self.names())}

    def x(self, batch: int | None = None, salt: int = 0) -> np.ndarray:
        return make_inputs(self.widths[0], batch or self.batch, self.seed + 7919 * salt, self.dtype)


@st.composite
def scenarios(
    draw,
    driver,
    *,
    n_adapters: tuple[int, int] = (1, 1),
    dtype: str | None = None,
    batches: tuple[int, ...] = (1, 3),
    layout: st.SearchStrategy[Layout] | None = None,
    **adapter_kwargs,
) -> Scenario:
    """Scenarios for `driver`: a layout (default `layouts(driver)`), `n_adapters` (min, max)
    adapters, dtype (default: precise)."""
    chosen = draw(layout if layout is not None else layouts(driver))
    specs = adapter_specs(driver, chosen.paths, **adapter_kwargs)
    adapters = draw(st.lists(specs, min_size=n_adapters[0], max_size=n_adapters[1]))
    return Scenario(
        layout=chosen,
        adapters=tuple(adapters),
        batch=draw(st.sampled_from(batches)),
        dtype=dtype or precise_dtype(driver),
        seed=draw(st.integers(0, 2**16)),
    )
