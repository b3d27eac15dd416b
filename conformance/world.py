"""The generated world: model layouts, pattern keys, target rules and adapter names.

Adversarial on purpose (specs/conformance.md, SW-SUITE-9). Layer paths are realistic and
collide: nesting (`model.layers.0.self_attn.q_proj`), names that are suffixes of others (`q`,
`xq`, `attn.q`, `cross_attn.q`), numbers that prefix others (`layers.1`, `layers.11`), a
single layer, up to 8 layers. Pattern keys and target rules are derived from the drawn paths so
that they land on both sides of the spec's matching rules (SW-SCALE-3: `(.*\\.)?(key)$` with
`re.match`; SW-TARGET-1: a name equals the path or ends it after a dot, a string must
`re.fullmatch`): matching keys, near misses (a partial segment, a number that only prefixes
one, a container), regular expressions. Every drawn value is checked against the oracle, so a
near miss is a test of the "no" side and a match of the "yes" side.

Drivers that compile per shape (they declare "compile_count", or set `few_shapes = True`) get
a few fixed layouts (`LAYOUT_PRESETS`) instead of free ones.

Example:
    >>> [k for k in pattern_keys(["layers.11.q"]) if k.startswith("1")]
    ['11.q', '1.q']
    >>> import re
    >>> [re.match(rf"(.*\\.)?({k})$", "layers.11.q") is not None for k in ("11.q", "1.q")]
    [True, False]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from hypothesis import strategies as st

__all__ = [
    "LAYOUT_PRESETS",
    "NAME_SETS",
    "SIMPLE_PRESETS",
    "Layout",
    "adapter_names",
    "few_shapes",
    "free_layouts",
    "layer_paths",
    "pattern_keys",
    "target_names",
    "target_regexes",
]


def layer_paths(n: int) -> list[str]:
    """The plain paths `blocks.0.q, blocks.0.o, blocks.1.q, ...` (SW-MODEL-1's example)."""
    return [f"blocks.{i // 2}.{'qo'[i % 2]}" for i in range(n)]


@dataclasses.dataclass(frozen=True)
class Layout:
    """A model's layer paths (in chain order) and widths `(in_1, out_1 = in_2, ..., out_n)`."""

    paths: tuple[str, ...]
    widths: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.paths) + 1 or len(set(self.paths)) != len(self.paths):
            raise ValueError(f"a layout needs unique paths and one more width: {self}")


def _plain(widths: tuple[int, ...]) -> Layout:
    return Layout(tuple(layer_paths(len(widths) - 1)), widths)


#: Layouts without colliding names (the world when the "layouts" feature is off).
SIMPLE_PRESETS = tuple(_plain(w) for w in ((4, 3, 5), (3, 6, 4, 2), (5, 4, 4, 3), (4, 6, 3)))
#: The few layouts of drivers that compile per shape: a plain one and four adversarial ones.
LAYOUT_PRESETS = (
    SIMPLE_PRESETS[0],
    Layout(("layers.1.q", "layers.11.q", "layers.1.xq", "head"), (5, 4, 4, 3, 4)),
    Layout(
        (
            "model.layers.0.self_attn.q_proj",
            "model.layers.10.mlp.proj",
            "layers.0.self_attn.q_proj",
        ),
        (4, 6, 3, 5),
    ),
    Layout(("q",), (3, 4)),
    Layout(("enc.attn.q", "enc.cross_attn.q", "q", "blocks.1.o"), (4, 3, 6, 2, 3)),
)

_CONTAINERS = ("blocks.{}", "layers.{}", "model.layers.{}", "h.{}", "encoder.layer.{}", "")
_INDICES = (0, 1, 10, 11, 2, 21, 12)
_LEAVES = (
    "q",
    "o",
    "xq",
    "qq",
    "q_proj",
    "proj",
    "o_proj",
    "attn.q",
    "cross_attn.q",
    "self_attn.q_proj",
    "mlp.proj",
    "mlp.down_proj",
    "mlp.0",
    "mlp.10",
    "head",
    "lm_head",
)


def few_shapes(driver) -> bool:
    """Whether `driver` should get only `LAYOUT_PRESETS` (it compiles per shape)."""
    return bool(getattr(driver, "few_shapes", "compile_count" in driver.capabilities))


@st.composite
def _path(draw) -> str:
    container = draw(st.sampled_from(_CONTAINERS)).format(draw(st.sampled_from(_INDICES)))
    leaf = draw(st.sampled_from(_LEAVES))
    return f"{container}.{leaf}" if container else leaf


def _no_prefixes(paths: Sequence[str]) -> tuple[str, ...]:
    """`paths` without duplicates and without a path that is a dotted prefix of another (a
    path names one layer, SW-MODEL-1)."""
    kept: list[str] = []
    for p in paths:
        if all(p != k and not p.startswith(k + ".") and not k.startswith(p + ".") for k in kept):
            kept.append(p)
    return tuple(kept)


@st.composite
def free_layouts(draw, max_layers: int = 8) -> Layout:
    """1 to `max_layers` layers with colliding realistic paths and widths 2..6."""
    paths = _no_prefixes(draw(st.lists(_path(), min_size=1, max_size=max_layers)))
    widths = draw(st.lists(st.integers(2, 6), min_size=len(paths) + 1, max_size=len(paths) + 1))
    return Layout(paths, tuple(widths))


def _number_near_misses(segments: list[str]) -> list[str]:
    """For each numeric segment of 2+ digits, the tail that starts inside it (`11.q` -> `1.q`),
    which ends the path as a string but not after a dot."""
    out = []
    for j, seg in enumerate(segments):
        if seg.isdigit() and len(seg) > 1:
            out.append(".".join([seg[1:], *segments[j + 1 :]]))
    return out


def pattern_keys(paths: Sequence[str]) -> list[str]:
    """Rank/alpha pattern keys for `paths` (SW-SCALE-3), matching and near misses, in a fixed
    order: the last segment, the last two, the whole path (dots unescaped and escaped), tails
    that start inside a number, a partial last segment, the container, and regexes."""
    keys: list[str] = []
    for path in paths:
        s = path.split(".")
        candidates = [s[-1], ".".join(s[-2:]), path, re.escape(path), *_number_near_misses(s)]
        if len(s[-1]) > 1:
            candidates += [s[-1][1:], f"[{s[-1][0]}x]{s[-1][1:]}"]
        if len(s) > 1:
            candidates += [".".join(s[:-1]), rf"\d+\.{s[-1]}", f"{s[-1]}|{s[0]}"]
        candidates.append(f".*{s[-1][-1]}")
        keys += [k for k in candidates if k not in keys]
    return keys


def target_names(paths: Sequence[str]) -> list[str]:
    """`target_modules` names for `paths` (SW-TARGET-1 list form): suffixes after a dot
    (match), partial segments, tails inside a number and containers (no match), an absent name."""
    names: list[str] = []
    for path in paths:
        s = path.split(".")
        candidates = [s[-1], ".".join(s[-2:]), path, *_number_near_misses(s)]
        if len(s[-1]) > 1:
            candidates.append(s[-1][1:])
        if len(s) > 1:
            candidates.append(".".join(s[:-1]))
        names += [n for n in candidates if n not in names]
    return [*names, "zz"]


def target_regexes(paths: Sequence[str]) -> list[str]:
    """`target_modules` strings for `paths` (SW-TARGET-1 regex form): whole-path matches, and
    strings that only `re.match` a prefix or `re.search` a part (no match), "all-linear", and a
    differently cased "ALL-LINEAR" (a regex matching no path)."""
    out: list[str] = ["all-linear"]
    for i, path in enumerate(paths):
        s = path.split(".")
        candidates = [re.escape(path), f".*{re.escape(s[-1])}", re.escape(s[-1])]
        if len(s) > 1:
            candidates += [re.escape(".".join(s[:-1])), re.escape(".".join(s[:-1])) + r"\..*"]
        if i:
            candidates.append(f"{re.escape(paths[i - 1])}|{re.escape(path)}")
        out += [r for r in candidates if r not in out]
    return [*out, "ALL-LINEAR"]


#: Adapter names that are valid (any non-empty string, SW-BANK-1) but not identifiers.
SPECIAL_NAMES = (
    "my.adapter",
    "user/fr-v2",
    "a b",
    "0",
    "default",
    "__base__",
    "None",
    "pop",
    "keys",
    "lora_A",
    "blocks.0.q",
    "ä名",
)
_NAME_CHARS = st.characters(
    codec="utf-8", categories=("L", "M", "N", "P", "S", "Zs"), exclude_characters="\\"
)


#: Fixed name sets (for drivers that compile per bank structure, `few_shapes`).
NAME_SETS = (
    ("my.adapter", "0", "a b"),
    ("default", "__base__", "ä名"),
    ("pop", "user/fr-v2", "None"),
    ("lora_A", "keys", "blocks.0.q"),
)


def adapter_names(n: int, fixed: bool = False) -> st.SearchStrategy[tuple[str, ...]]:
    """`n` distinct valid adapter names: special ones and random non-empty strings (only the
    first `n` of one of `NAME_SETS` when `fixed`)."""
    if fixed:
        return st.sampled_from(NAME_SETS).map(lambda names: names[:n])
    text = st.text(_NAME_CHARS, min_size=1, max_size=8).filter(str.isprintable)
    name = st.one_of(st.sampled_from(SPECIAL_NAMES), text)
    return st.lists(name, min_size=n, max_size=n, unique=True).map(tuple)
