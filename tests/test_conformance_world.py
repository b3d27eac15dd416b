"""The generated world is adversarial (SW-SUITE-9): colliding paths, keys and target rules on
both sides of the spec's matching rules, adapter names beyond identifiers."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from conformance.drivers.reference import ReferenceDriver
from conformance.strategies import adapter_specs, layouts, on
from conformance.world import (
    LAYOUT_PRESETS,
    SPECIAL_NAMES,
    adapter_names,
    few_shapes,
    free_layouts,
    pattern_keys,
    target_names,
    target_regexes,
)
from jaxlora import reference

PATHS = ["layers.1.q", "layers.11.q", "layers.1.xq", "model.layers.1.q", "head"]
_SETTINGS = settings(max_examples=30, deadline=None, database=None)
#: `find` settings: search, no shrinking (the found example only has to exist)
_FIND = dict(database=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])


def _key_matches(key: str, path: str) -> bool:
    return re.match(rf"(.*\.)?({key})$", path) is not None


@pytest.mark.clause("SW-SUITE-9")
@_SETTINGS
@given(free_layouts())
def test_free_layouts_are_valid_models(layout):
    """SW-SUITE-9: a free layout has 1 to 8 unique paths, none a dotted prefix of another (a
    path names one layer), and one more width than layers, each 2..6."""
    paths = layout.paths
    assert 1 <= len(paths) <= 8 and len(set(paths)) == len(paths)
    assert not [(p, q) for p in paths for q in paths if q.startswith(p + ".")]
    assert len(layout.widths) == len(paths) + 1 and all(2 <= w <= 6 for w in layout.widths)


@pytest.mark.clause("SW-SUITE-9")
def test_free_layouts_collide_and_nest():
    """SW-SUITE-9: the free layouts reach 6+ layers, a number that prefixes another in the same
    position (`layers.1.q` / `layers.11.q`), a name that ends another after a dot and one that
    ends it inside a segment (`q` / `xq`), deep nesting and a single layer."""
    cfg = settings(max_examples=2000, **_FIND)

    def numbers(layout):
        return any(
            p.replace(".1.", ".11.") == q or p.replace(".1.", ".10.") == q
            for p in layout.paths
            for q in layout.paths
        )

    def suffixes(layout):
        ends = {p.split(".")[-1] for p in layout.paths}
        return "q" in ends and "xq" in ends

    assert len(find(free_layouts(), lambda lay: len(lay.paths) >= 6, settings=cfg).paths) >= 6
    assert numbers(find(free_layouts(), numbers, settings=cfg))
    assert suffixes(find(free_layouts(), suffixes, settings=cfg))
    deep = find(free_layouts(), lambda lay: any(p.count(".") >= 4 for p in lay.paths), settings=cfg)
    assert any(p.count(".") >= 4 for p in deep.paths)
    assert len(find(free_layouts(), lambda lay: len(lay.paths) == 1, settings=cfg).paths) == 1


@pytest.mark.clause("SW-SUITE-9")
def test_pattern_keys_land_on_both_sides_of_the_rule():
    """SW-SUITE-9, SW-SCALE-3: the keys derived from a path include keys that match it under
    `(.*\\.)?(key)$` and near misses that a plain `endswith` / `re.search` would match but the
    rule does not (a tail starting inside `11`, a partial last segment, the container)."""
    keys = pattern_keys(["layers.11.q"]) + pattern_keys(["layers.1.xq"])
    hits = {k for k in keys if _key_matches(k, "layers.11.q")}
    misses = set(keys) - hits
    assert {"q", "11.q", "layers.11.q", r"layers\.11\.q"} <= hits
    assert "1.q" in misses and "layers.11.q".endswith("1.q")  # an endswith bug would match
    assert "layers.11" in misses and re.search("layers.11", "layers.11.q")
    assert "q" in keys and not _key_matches("q", "layers.1.xq")  # `q` does not end `xq`
    assert any(set(k) & set("|[]*\\") for k in keys)  # regular-expression keys


@pytest.mark.clause("SW-SUITE-9")
def test_target_rules_land_on_both_sides_of_the_rule():
    """SW-SUITE-9, SW-TARGET-1: the derived names and regexes include ones the spec's rules
    accept and ones they refuse that a prefix match, a plain suffix or a case-insensitive
    "all-linear" would accept."""
    names, regexes = target_names(PATHS), target_regexes(PATHS)
    assert reference.targets(["q"], PATHS) == ["layers.1.q", "layers.11.q", "model.layers.1.q"]
    assert reference.targets(["1.q"], ["layers.11.q"]) == []  # though it ends with "1.q"
    assert "1.q" in names and "xq"[1:] in names
    prefix_only = [r for r in regexes if not reference.targets(r, PATHS)]
    assert any(re.match(r, p) for r in prefix_only for p in PATHS)  # re.match would target
    assert "all-linear" in regexes and "ALL-LINEAR" in regexes
    assert reference.targets("ALL-LINEAR", PATHS) == []


@pytest.mark.clause("SW-SUITE-9")
@_SETTINGS
@given(st.data())
def test_patterns_have_distinct_values_and_often_several_keys_on_one_path(data):
    """SW-SUITE-9: rank/alpha patterns hold up to 3 keys with distinct values (so the
    first-match rule is observable)."""
    spec = data.draw(adapter_specs(ReferenceDriver(), PATHS, patterns=True))
    for pattern in (spec.rank_pattern, spec.alpha_pattern):
        values = [v for _, v in pattern]
        assert len(pattern) <= 3 and len(set(values)) == len(values)
    assert spec.rank_pattern


@pytest.mark.clause("SW-SUITE-9")
def test_several_keys_match_one_path_in_both_orders():
    """SW-SUITE-9: the patterns drawn include two keys matching the same path, with either key
    first."""
    specs = adapter_specs(ReferenceDriver(), PATHS, patterns=True)
    cfg = settings(max_examples=3000, **_FIND)

    def two_on_one(order):
        def ok(spec):
            keys = [k for k, _ in spec.rank_pattern]
            return any(
                len(m) >= 2 and m[0] == order(m)
                for m in ([k for k in keys if _key_matches(k, p)] for p in PATHS)
            )

        return ok

    first_shorter = find(specs, two_on_one(lambda m: min(m, key=len)), settings=cfg)
    first_longer = find(specs, two_on_one(lambda m: max(m, key=len)), settings=cfg)
    assert first_shorter.rank_pattern and first_longer.rank_pattern


@pytest.mark.clause("SW-SUITE-9")
@_SETTINGS
@given(adapter_names(3))
def test_adapter_names_are_valid_and_distinct(names):
    """SW-SUITE-9: the adapter names are distinct non-empty printable strings (valid names)."""
    assert len(set(names)) == 3 and all(n and n.isprintable() for n in names)


@pytest.mark.clause("SW-SUITE-9")
def test_adapter_names_go_beyond_identifiers():
    """SW-SUITE-9: the names drawn include dots, spaces, digits first, non-ASCII letters and
    reserved-looking words."""
    assert {"my.adapter", "a b", "0", "default", "__base__", "pop"} <= set(SPECIAL_NAMES)
    cfg = settings(max_examples=500, **_FIND)
    odd = find(adapter_names(1), lambda n: not n[0].isascii(), settings=cfg)
    assert not odd[0].isascii()


@pytest.mark.clause("SW-SUITE-9")
def test_compiling_drivers_get_the_fixed_layouts():
    """SW-SUITE-9: a driver that declares "compile_count" (or `few_shapes = True`) draws only
    the fixed `LAYOUT_PRESETS`; "layouts" switched off gives the plain ones."""

    class Compiled(ReferenceDriver):
        capabilities = ReferenceDriver.capabilities | {"compile_count"}

    class Declared(ReferenceDriver):
        few_shapes = True

    assert few_shapes(Compiled()) and few_shapes(Declared()) and not few_shapes(ReferenceDriver())

    @settings(max_examples=40, database=None, deadline=None)
    @given(layouts(Compiled()))
    def only_presets(layout):
        assert layout in LAYOUT_PRESETS

    only_presets()
    off = ReferenceDriver()
    off.suite_features_off = frozenset({"layouts"})
    assert not on(off, "layouts") and on(ReferenceDriver(), "layouts")
