"""Hypothesis strategies for the suite: base models (SW-MODEL-1), adapters, inputs and dtypes.

Cases are small frozen dataclasses with a short `repr` (what a failure report prints as the
shrunk counterexample); the NumPy arrays are derived from a seed, so a case stays readable.
Values are rounded to the case's dtype before any driver or the oracle sees them (SW-TOL-1: the
oracle computes in float64 from the very values the implementation holds).

Example:
    >>> spec = AdapterSpec(rank=2, alpha=4.0, targets=(0,))
    >>> layers = make_layers((4, 3, 2), seed=0, dtype="float32")
    >>> [p for p, _, _ in layers]
    ['blocks.0.q', 'blocks.0.o']
    >>> spec.build(layers, seed=1, dtype="float32").scale_at("blocks.0.q")
    2.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from hypothesis import strategies as st

from jaxlora.reference import RefAdapter

from .driver import Layers

__all__ = [
    "ALPHAS",
    "PATTERN_KEYS",
    "RANKS",
    "WIDTH_PRESETS",
    "AdapterSpec",
    "Scenario",
    "adapter_specs",
    "layer_paths",
    "make_inputs",
    "make_layers",
    "precise_dtype",
    "round_to",
    "scenarios",
    "supported_dtypes",
    "target_rules",
    "widths",
]

#: Layer widths `(in_1, out_1 = in_2, ..., out_n)`: a few fixed sets, since every new shape is a
#: new compilation for a jitted implementation. Non-square layers catch orientation bugs.
WIDTH_PRESETS = ((4, 3, 5), (3, 6, 4, 2), (5, 4, 4, 3), (4, 6, 3))
RANKS = (1, 2, 4)
ALPHAS = (1.0, 2.0, 3.0, 8.0, 16.0)
#: rank/alpha pattern keys (PEFT's `(.*\.)?(key)$` rule, SW-SCALE-3), over `layer_paths` names.
PATTERN_KEYS = ("q", "o", "0.q", "1.o", "blocks.0.o", r"blocks\.1\.q")
FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")


def layer_paths(n: int) -> list[str]:
    """The spec model's paths: `blocks.0.q, blocks.0.o, blocks.1.q, ...` (SW-MODEL-1)."""
    return [f"blocks.{i // 2}.{'qo'[i % 2]}" for i in range(n)]


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


def make_layers(widths: tuple[int, ...], seed: int, dtype: str) -> Layers:
    """Random base layers for `widths` (SW-MODEL-1), rounded to `dtype`."""
    rng = np.random.default_rng([seed, 0])
    layers = []
    for path, d_in, d_out in zip(layer_paths(len(widths) - 1), widths, widths[1:], strict=False):
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
        rank_pattern = dict(self.rank_pattern)
        ad = RefAdapter(
            r=self.rank,
            lora_alpha=float(self.alpha),
            weights={},
            use_rslora=self.rslora,
            rank_pattern=rank_pattern,
            alpha_pattern=dict(self.alpha_pattern),
        )
        shapes = {p: w.shape for p, w, _ in layers}
        targeted = self.paths(layers)
        for path in shapes:
            d_in, d_out = shapes[path]
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


def widths() -> st.SearchStrategy[tuple[int, ...]]:
    """Model widths from `WIDTH_PRESETS`."""
    return st.sampled_from(WIDTH_PRESETS)


@st.composite
def _patterns(draw, values: Iterable) -> tuple:
    keys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=2, unique=True))
    values = tuple(values)
    return tuple((k, draw(st.sampled_from(values))) for k in keys)


def adapter_specs(
    driver,
    *,
    ranks: tuple[int, ...] = RANKS,
    rslora: bool | None = None,
    patterns: bool | None = None,
) -> st.SearchStrategy[AdapterSpec]:
    """Adapters: rank, alpha, targets; rsLoRA and patterns when the driver declares them.

    Arguments:
        driver: its capabilities decide whether rsLoRA/patterns are drawn (when not forced).
        ranks: the ranks to draw from.
        rslora, patterns: force on (True) or off (False); None: draw when supported.
    """
    caps = driver.capabilities
    rs = (
        st.just(rslora)
        if rslora is not None
        else st.booleans()
        if "rslora" in caps
        else st.just(False)
    )
    use_patterns = patterns if patterns is not None else "patterns" in caps
    pat_r = _patterns(ranks) if use_patterns else st.just(())
    pat_a = _patterns(ALPHAS) if use_patterns else st.just(())
    if patterns:
        pat_r = pat_r.filter(bool)
    return st.builds(
        AdapterSpec,
        rank=st.sampled_from(ranks),
        alpha=st.sampled_from(ALPHAS),
        targets=st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(
            lambda t: tuple(sorted(t))
        ),
        rslora=rs,
        rank_pattern=pat_r,
        alpha_pattern=pat_a,
    )


def target_rules() -> st.SearchStrategy:
    """`target_modules` values (a list of names or a regex string, SW-TARGET-1)."""
    names = st.lists(
        st.sampled_from(["q", "o", "0.q", "blocks.1.o", "k", "blocks.0"]),
        min_size=1,
        max_size=3,
        unique=True,
    )
    regex = st.sampled_from([r"blocks\.\d\.q", r".*o", "all-linear", r"blocks\.1\..*", "q"])
    return st.one_of(names, regex)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A model, some adapters named `a0, a1, ...`, an input batch and a dtype, from one seed.

    Example:
        >>> sc = Scenario((4, 3, 5), (AdapterSpec(1, 2.0, (1,)),), batch=2, dtype="float64", seed=0)
        >>> sc.x().shape, sorted(sc.adapters_by_name())
        ((2, 4), ['a0'])
    """

    widths: tuple[int, ...]
    adapters: tuple[AdapterSpec, ...]
    batch: int
    dtype: str
    seed: int

    def __repr__(self) -> str:
        return (
            f"Scenario(widths={self.widths}, adapters={list(self.adapters)}, "
            f"batch={self.batch}, dtype={self.dtype!r}, seed={self.seed})"
        )

    def layers(self) -> Layers:
        return make_layers(self.widths, self.seed, self.dtype)

    def names(self) -> list[str]:
        return [f"a{i}" for i in range(len(self.adapters))]

    def adapter(self, i: int, **kwargs) -> RefAdapter:
        """Adapter `i` (see `AdapterSpec.build` for `pad_rank` / `zero_layers`)."""
        return self.adapters[i].build(self.layers(), self.seed * 31 + i, self.dtype, **kwargs)

    def adapters_by_name(self) -> dict[str, RefAdapter]:
        return {n: self.adapter(i) for i, n in enumerate(self.names())}

    def x(self, batch: int | None = None, salt: int = 0) -> np.ndarray:
        return make_inputs(self.widths[0], batch or self.batch, self.seed + 7919 * salt, self.dtype)


def scenarios(
    driver,
    *,
    n_adapters: tuple[int, int] = (1, 1),
    dtype: str | None = None,
    batches: tuple[int, ...] = (1, 3),
    **adapter_kwargs,
) -> st.SearchStrategy[Scenario]:
    """Scenarios for `driver`: `n_adapters` (min, max) adapters, dtype (default: precise)."""
    return st.builds(
        Scenario,
        widths=widths(),
        adapters=st.lists(
            adapter_specs(driver, **adapter_kwargs), min_size=n_adapters[0], max_size=n_adapters[1]
        ).map(tuple),
        batch=st.sampled_from(batches),
        dtype=st.just(dtype or precise_dtype(driver)),
        seed=st.integers(0, 2**16),
    )
