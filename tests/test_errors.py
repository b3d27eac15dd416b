"""Errors: every class in `jaxlora.errors` is raised with a message that names what was wrong
and what exists, and a failed call changes nothing (spec SW-ERROR-1, SW-ACTIVE-3, SW-TARGET-2,
SW-CONFIG-1, SW-MIXED-2)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
import jaxlora.sharding
from jaxlora import errors
from jaxlora.models import read_config


@dataclasses.dataclass
class World:
    model: jaxlora.DenseChain
    bank: jaxlora.AdapterBank
    x: jax.Array


def make_world() -> World:
    rng = np.random.default_rng(0)
    model = jaxlora.DenseChain.from_layers(
        {
            "blocks.0.q": (rng.normal(size=(4, 6)), np.zeros(6)),
            "head": (rng.normal(size=(6, 3)), np.zeros(3)),
        },
        dtype=jnp.float32,
    )

    def adapter(r, targets):
        cfg = jaxlora.LoraConfig(r=r, target_modules=targets)
        shapes = model.layer_shapes()
        return jaxlora.make_adapter(
            cfg,
            {
                p: (rng.normal(size=(shapes[p][0], r)), rng.normal(size=(r, shapes[p][1])))
                for p in jaxlora.match_targets(targets, shapes)
            },
        )

    bank = jaxlora.AdapterBank({"alpha": adapter(2, ["q"]), "beta": adapter(3, ["q", "head"])})
    return World(model, bank, jnp.ones((2, 4), jnp.float32))


def foreign(w: World) -> dict:
    """An adapter for a layer the model lacks."""
    return {"blocks.9.q": jaxlora.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 6)), jnp.asarray(1.0))}


def wrong_shape(w: World) -> dict:
    """An adapter for `head` (6 -> 3) with factors for a 4 -> 3 layer."""
    return {"head": jaxlora.LoraWeights(jnp.ones((4, 1)), jnp.ones((1, 3)), jnp.asarray(1.0))}


def bad_stack(w: World):
    """A stacked bank built for other shapes."""
    st = jaxlora.stack(jaxlora.conform(w.bank))
    bogus = {p: jaxlora.LoraWeights(v.a[:, :2], v.b, v.scale) for p, v in st.weights.items()}
    return jaxlora.StackedBank(bogus, st.names)


def nan_adapter(w: World) -> dict:
    b = np.ones((1, 3))
    b[0, 0] = np.nan
    return jaxlora.make_adapter(jaxlora.LoraConfig(r=1), {"head": (np.ones((6, 1)), b)})


#: (error class, clause, message regex, trigger): every trigger must raise its class with a
#: message matching the regex; the regex checks that the names/paths/shapes/fix are present.
CASES: list[tuple[type, str, str, Callable[[World], object]]] = [
    (
        errors.AdapterNotFoundError,
        "SW-ACTIVE-3",
        r"no adapter named 'gamma'\. The bank holds: 'alpha', 'beta'",
        lambda w: jaxlora.select(w.bank, ["alpha", "gamma"]),
    ),
    (
        errors.AdapterNotFoundError,
        "SW-BANK-2",
        r"'gamma'.*'alpha', 'beta'",
        lambda w: w.bank.remove("gamma"),
    ),
    (
        errors.AdapterNotFoundError,
        "SW-MIXED-2",
        r"'gamma'.*Slots: 'alpha', 'beta'",
        lambda w: jaxlora.stack(jaxlora.conform(w.bank)).ids(["alpha", "gamma"]),
    ),
    (
        errors.AdapterNotFoundError,
        "SW-ACTIVE-3",
        r"'gamma'.*'alpha', 'beta'",
        lambda w: jaxlora.combine(w.bank, ["alpha", "gamma"], [1.0, 1.0]),
    ),
    (
        errors.ConfigError,
        "SW-BANK-1",
        r"adapter names must be non-empty strings, got \['x'\]",
        lambda w: w.bank.add(["x"], w.bank["beta"]),
    ),
    (
        errors.ConfigError,
        "SW-ACTIVE-1",
        r"`lora=` takes jaxlora.select\(bank, names\).*got str \(a name: use "
        r"jaxlora.select\(bank, 'alpha'\)\)",
        lambda w: jaxlora.forward(w.model, w.x, "alpha"),
    ),
    (
        errors.ConfigError,
        "SW-MERGE-1",
        r"got 'alpha'\. To merge by name: merge\(params, bank\[name\]\)",
        lambda w: jaxlora.merge(w.model, "alpha"),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"`rank_pattern` must map module-name patterns \(str\) to values, got \[\('q', 2\)\]",
        lambda w: jaxlora.LoraConfig(rank_pattern=[("q", 2)]),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"rank_pattern\['q'\] must be a positive integer, got True",
        lambda w: jaxlora.LoraConfig(rank_pattern={"q": True}),
    ),
    (
        errors.ConfigError,
        "SW-SHARD-1",
        r"make_mesh: `slot` must be a positive device count, got 0",
        lambda w: jaxlora.sharding.make_mesh(slot=0),
    ),
    (
        errors.ShapeMismatchError,
        "SW-SLOT-3",
        r"adapter 'new', layer 'head': expected a \[in, r\], b \[r, out\], got a\(6, 2\) and "
        r"b\(1, 3\)",
        lambda w: jaxlora.replace_slot(
            jaxlora.stack(jaxlora.conform(w.bank)),
            0,
            {"head": jaxlora.LoraWeights(jnp.ones((6, 2)), jnp.ones((1, 3)), jnp.asarray(1.0))},
            name="new",
            donate=False,
        ),
    ),
    (
        errors.AdapterExistsError,
        "SW-BANK-1",
        r"'alpha' already exists.*replace\('alpha'",
        lambda w: w.bank.add("alpha", w.bank["beta"]),
    ),
    (
        errors.ConfigError,
        "SW-ACTIVE-1",
        r"lists 'beta' more than once",
        lambda w: jaxlora.select(w.bank, ["beta", "alpha", "beta"]),
    ),
    (
        errors.TargetNotFoundError,
        "SW-TARGET-2",
        r"'blocks\.9\.q'.*Accepted paths: 'blocks\.0\.q', 'head'",
        lambda w: jaxlora.forward(w.model, w.x, lora=jaxlora.Active.of(foreign(w))),
    ),
    (
        errors.TargetNotFoundError,
        "SW-TARGET-2",
        r"targets 'blocks\.9\.q', which the model does not have.*Accepted paths: "
        r"'blocks\.0\.q', 'head'",
        lambda w: jaxlora.merge(w.model, foreign(w)),
    ),
    (
        errors.ShapeMismatchError,
        "SW-TARGET-2",
        r"layer 'head': the layer maps \(6, 3\) \(in, out\) but the LoRA weights are a\(4, 1\) "
        r"b\(1, 3\).*transposed",
        lambda w: jaxlora.forward(w.model, w.x, lora=wrong_shape(w)),
    ),
    (
        errors.ShapeMismatchError,
        "SW-TARGET-2",
        r"'head'.*kernel is \(6, 3\).*\(4, 3\)",
        lambda w: jaxlora.merge(w.model, wrong_shape(w)),
    ),
    (
        errors.ShapeMismatchError,
        "SW-TARGET-2",
        r"stacked bank, layer 'blocks\.0\.q': the layer maps \(4, 6\) \(in, out\) but the LoRA "
        r"weights are a\(2, 2, 3\)",
        lambda w: jaxlora.forward(
            w.model, w.x, lora=jaxlora.Routed(bad_stack(w), jnp.zeros(2, jnp.int32))
        ),
    ),
    (
        errors.ShapeMismatchError,
        "SW-MIXED-2",
        r"Routed ids have shape \(3,\) but the batch has 2 rows.*stacked\.route\(names\)",
        lambda w: jaxlora.forward(
            w.model,
            w.x,
            lora=jaxlora.Routed(jaxlora.stack(jaxlora.conform(w.bank)), jnp.zeros(3, jnp.int32)),
        ),
    ),
    (
        errors.ShapeMismatchError,
        "SW-NOTATION-1",
        r"layer 'l0'.*a\(2, 3\) and b\(2, 3\).*transpose",
        lambda w: jaxlora.make_adapter(
            jaxlora.LoraConfig(r=2), {"l0": (np.ones((2, 3)), np.ones((2, 3)))}
        ),
    ),
    (
        errors.ShapeMismatchError,
        "SW-CONFORM-3",
        r"adapters 'alpha' and 'beta' target different layers.*conform",
        lambda w: jaxlora.stack(w.bank),
    ),
    (
        errors.ConfigError,
        "SW-CONFORM-1",
        r"max_rank=1 is below the rank .* of adapter '(alpha|beta)'",
        lambda w: jaxlora.conform(w.bank, max_rank=1),
    ),
    (
        errors.ConfigError,
        "SW-CONFORM-1",
        r"`max_rank` must be a positive integer or None, got 2\.5",
        lambda w: jaxlora.conform(w.bank, max_rank=2.5),
    ),
    (
        errors.ConfigError,
        "SW-TARGET-1",
        r"matches none of the layers: 'blocks\.0\.q', 'head'",
        lambda w: jaxlora.init_adapter(
            jax.random.key(0), jaxlora.LoraConfig(target_modules=["k"]), w.model.layer_shapes()
        ),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"`r` must be a positive integer, got r=0",
        lambda w: jaxlora.LoraConfig(r=0),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"rank_pattern key 'q\[' is not a valid regular expression",
        lambda w: jaxlora.LoraConfig(rank_pattern={"q[": 2}),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"target_modules '\(a\|aa\)\*c' repeats a group .* refused",
        lambda w: jaxlora.LoraConfig(target_modules="(a|aa)*c"),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"alpha_pattern key '\(q\+\)\+' repeats a group",
        lambda w: jaxlora.LoraConfig(alpha_pattern={"(q+)+": 2.0}),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"target_modules is 1001 characters long; at most 1000",
        lambda w: jaxlora.LoraConfig(target_modules="q" * 1001),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"`target_modules` must be a regex string or a list of module names.*got \[1, 2\]",
        lambda w: jaxlora.LoraConfig(target_modules=[1, 2]),
    ),
    (
        errors.ConfigError,
        "SW-CONFIG-1",
        r"`lora_alpha` must be a finite number, got nan",
        lambda w: jaxlora.LoraConfig(lora_alpha=float("nan")),
    ),
    (
        errors.ConfigError,
        "SW-COMBINE-1",
        r"unknown combination method 'mean'.*'cat', 'linear', 'svd'",
        lambda w: jaxlora.combine(w.bank, ["alpha"], [1.0], "mean"),
    ),
    (
        errors.UnsupportedFeatureError,
        "SW-CONFIG-1",
        r"use_dora=True is not supported.*refused rather than ignored",
        lambda w: jaxlora.LoraConfig(use_dora=True),
    ),
    (
        errors.UnsupportedFeatureError,
        "SW-CONFIG-1",
        r"bias='all' is not supported",
        lambda w: jaxlora.LoraConfig(bias="all"),
    ),
    (
        errors.NonFiniteError,
        "SW-MERGE-4",
        r"adapter 'bad', layer 'head'.*NaN/Inf.*nothing was merged",
        lambda w: jaxlora.merge(w.model, {"bad": nan_adapter(w)}, safe=True),
    ),
    (
        errors.AdapterFormatError,
        "SW-ERROR-1",
        r"no-such-adapter-dir.*no such adapter directory",
        lambda w: jaxlora.io.load_peft("/nonexistent/no-such-adapter-dir"),
    ),
    (
        errors.CheckpointError,
        "SW-ERROR-1",
        r"no-such-checkpoint' is not a directory",
        lambda w: read_config("/nonexistent/no-such-checkpoint"),
    ),
]


def snapshot(w: World):
    return (
        w.bank.names,
        [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves((w.model, w.bank, w.x))],
        jax.tree.structure((w.model, w.bank)),
    )


@pytest.mark.clause(
    "SW-ERROR-1",
    "SW-ACTIVE-1",
    "SW-ACTIVE-3",
    "SW-BANK-1",
    "SW-BANK-2",
    "SW-TARGET-1",
    "SW-TARGET-2",
    "SW-CONFIG-1",
    "SW-MIXED-2",
    "SW-MERGE-4",
    "SW-NOTATION-1",
    "SW-CONFORM-1",
    "SW-CONFORM-3",
    "SW-COMBINE-1",
)
@pytest.mark.parametrize(
    ("error", "clause", "message", "trigger"),
    CASES,
    ids=[f"{c[0].__name__}-{c[1]}-{i}" for i, c in enumerate(CASES)],
)
def test_error_names_what_is_wrong_and_changes_nothing(error, clause, message, trigger):
    """SW-ERROR-1 (each case names its own clause: SW-ACTIVE-1, SW-ACTIVE-3, SW-BANK-1,
    SW-BANK-2, SW-TARGET-1, SW-TARGET-2, SW-CONFIG-1, SW-MIXED-2, SW-MERGE-4, SW-NOTATION-1,
    SW-CONFORM-1, SW-CONFORM-3, SW-COMBINE-1): each bad call raises its documented error class, a
    JaxLoraError, whose message names the adapter / path / shapes and what exists; the bank, the
    model and the input are unchanged afterwards."""
    world = make_world()
    before = snapshot(world)
    with pytest.raises(error, match=message) as info:
        trigger(world)
    assert isinstance(info.value, errors.JaxLoraError)
    assert snapshot(world) == before, f"{clause}: the failed call changed its inputs"


@pytest.mark.clause("SW-ERROR-1")
def test_every_error_class_is_triggered_above():
    """SW-ERROR-1: the table above raises every public error class of `jaxlora.errors`."""
    public = {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.JaxLoraError) and obj is not errors.JaxLoraError
    }
    assert public == {c[0] for c in CASES}, public ^ {c[0] for c in CASES}


@pytest.mark.clause("SW-ERROR-1", "SW-ACTIVE-3")
def test_errors_are_also_the_builtin_kinds():
    """SW-ERROR-1, SW-ACTIVE-3: the classes also derive from the built-in kind a Python user
    expects, so a missing name is a KeyError (Mapping.get and `in` work) and messages print
    unquoted."""
    world = make_world()
    assert world.bank.get("gamma") is None and "gamma" not in world.bank
    with pytest.raises(KeyError) as info:
        world.bank["gamma"]
    assert str(info.value).startswith("no adapter named 'gamma'")
    assert issubclass(errors.AdapterExistsError, ValueError)
    assert issubclass(errors.UnsupportedFeatureError, NotImplementedError)
    assert errors.format_names([f"n{i}" for i in range(25)], limit=2) == "'n0', 'n1', ... (23 more)"
    assert errors.format_names([]) == "(none)"
