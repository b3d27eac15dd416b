"""Random operation sequences against a driver, every output checked (a Hypothesis state machine).

`OperationSequences` keeps a model of what the driver should hold (adapters, active set) and
drives add / delete / set-active / disable / forward / mixed forward / merge-unmerge in random
order. After every forward it compares with the float64 oracle and with every earlier output
for the same (bank contents, active set, input), which must be bitwise equal (SW-HISTORY-1).
Refused operations (unknown names, duplicate adds, unknown deletes) must raise and change
nothing, which the next forward checks. With "exact_unmerge", the output after merge + unmerge
must equal the output before bitwise (SW-MERGE-2); without it, within tolerance (SW-MERGE-3).
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from jaxlora import reference

from .compare import blame, expect_close, expect_equal, expect_error, oracle
from .registry import clause
from .strategies import adapter_specs, layouts, make_inputs, make_layers, on, precise_dtype
from .world import NAME_SETS as WORLD_NAME_SETS

__all__ = ["NAME_SETS", "OperationSequences"]

#: The machine's three adapter names: identifiers, or (feature "names") other valid names.
NAME_SETS = (("a", "b", "c"), *WORLD_NAME_SETS[:2])
UNKNOWN = "no_such_adapter"


@clause(
    "SW-HISTORY-1",
    "SW-FORWARD-1",
    "SW-ACTIVE-2",
    "SW-ACTIVE-3",
    "SW-BANK-1",
    "SW-BANK-2",
    "SW-MIXED-1",
    "SW-MIXED-2",
    "SW-MERGE-1",
    "SW-MERGE-2",
    "SW-MERGE-3",
    clause_needs={
        "SW-MIXED-1": {"mixed"},
        "SW-MIXED-2": {"mixed"},
        "SW-MERGE-1": {"merge"},
        "SW-MERGE-2": {"merge", "exact_unmerge"},
        "SW-MERGE-3": {"merge"},
    },
)
class OperationSequences(RuleBasedStateMachine):
    """SW-HISTORY-1, SW-FORWARD-1, SW-ACTIVE-2, SW-ACTIVE-3, SW-BANK-1, SW-BANK-2, SW-MIXED-1,
    SW-MIXED-2, SW-MERGE-1, SW-MERGE-2 (exact return, with "exact_unmerge"), SW-MERGE-3 over
    random operation sequences (see the module doc)."""

    def __init__(self, driver):
        super().__init__()
        self.driver = driver
        self.caps = driver.capabilities
        self.dtype = precise_dtype(driver)
        self.adapters: dict[str, reference.RefAdapter] = {}
        self.tokens: dict[str, int] = {}  # name -> id of the adapter value added under it
        self.counter = itertools.count()
        self.active: tuple[str, ...] = ()
        self.seen: dict[tuple, np.ndarray] = {}  # history key -> first output
        self.deleted_active = False
        self.names = NAME_SETS[0]

    @initialize(data=st.data(), seed=st.integers(0, 2**16))
    def build(self, data, seed):
        layout = data.draw(layouts(self.driver), label="layout")
        if on(self.driver, "names"):
            self.names = data.draw(st.sampled_from(NAME_SETS), label="names")
        self.layers = make_layers(layout, seed, self.dtype)
        self.paths = layout.paths
        self.width = layout.widths[0]
        x = self._x(0, 3)
        with blame("SW-MODEL-1", f"build {layout.paths}"):
            self.driver.build(self.layers, self.dtype)
            y = self.driver.forward(x)
        expect_close("SW-MODEL-1", y, oracle(self.layers, x, []), self.dtype, "base model")

    # -- bank --------------------------------------------------------------------------------
    @rule(i=st.integers(0, 2), data=st.data(), seed=st.integers(0, 2**16))
    def add(self, i, data, seed):
        name = self.names[i]
        spec = data.draw(adapter_specs(self.driver, self.paths), label="adapter")
        adapter = spec.build(self.layers, seed, self.dtype)
        if name in self.adapters:
            call = lambda: self.driver.add_adapter(name, adapter)  # noqa: E731
            expect_error("SW-BANK-1", self.driver, call, f"add existing {name!r}", [name])
            return
        with blame("SW-BANK-1", f"add {name!r}"):
            self.driver.add_adapter(name, adapter)
        self.adapters[name] = adapter
        self.tokens[name] = next(self.counter)

    @rule(i=st.integers(0, 3))
    def delete(self, i):
        name = (*self.names, UNKNOWN)[i]
        if name not in self.adapters:
            call = lambda: self.driver.delete_adapter(name)  # noqa: E731
            expect_error("SW-BANK-2", self.driver, call, f"delete unknown {name!r}", [name])
            return
        with blame("SW-BANK-2", f"delete {name!r}"):
            self.driver.delete_adapter(name)
        del self.adapters[name]
        if name in self.active:
            self.active = tuple(n for n in self.active if n != name)
            self.deleted_active = True

    # -- active set --------------------------------------------------------------------------
    @rule(data=st.data())
    def set_active(self, data):
        names = st.sampled_from((*self.names, UNKNOWN))
        choices = [names]
        if "multi_active" in self.caps:
            choices.append(st.lists(names, min_size=1, max_size=3, unique=True))
        choice = data.draw(st.one_of(*choices))
        wanted = (choice,) if isinstance(choice, str) else tuple(choice)
        unknown = [n for n in wanted if n not in self.adapters]
        if unknown:
            call = lambda: self.driver.set_active(choice)  # noqa: E731
            expect_error("SW-ACTIVE-3", self.driver, call, f"set_active({choice!r})", unknown[:1])
            return
        with blame("SW-ACTIVE-1", f"set_active({choice!r})"):
            self.driver.set_active(choice)
        self.active = wanted

    @rule()
    def disable(self):
        with blame("SW-ACTIVE-2", "set_active(None)"):
            self.driver.set_active(None)
        self.active = ()

    # -- forwards ----------------------------------------------------------------------------
    def _x(self, x_seed: int, batch: int) -> np.ndarray:
        return make_inputs(self.width, batch, x_seed, self.dtype)

    @rule(x_seed=st.integers(0, 2), batch=st.sampled_from((1, 3)))
    def forward(self, x_seed, batch):
        x = self._x(x_seed, batch)
        what = f"forward with active {list(self.active)}"
        if self.deleted_active:
            clause_id, what = "SW-BANK-2", what + " after deleting an active adapter"
        else:
            clause_id = "SW-FORWARD-1" if self.active else "SW-ACTIVE-2"
            clause_id = clause_id if self.adapters else "SW-MODEL-1"
        with blame(clause_id, what):
            y = np.asarray(self.driver.forward(x))
        want = oracle(self.layers, x, [self.adapters[n] for n in self.active])
        expect_close(clause_id, y, want, self.dtype, what)
        self.deleted_active = False
        key = (frozenset(self.tokens[n] for n in self.adapters), self.active, x_seed, batch)
        if key in self.seen:
            expect_equal("SW-HISTORY-1", y, self.seen[key], what + " vs the same state earlier")
        else:
            self.seen[key] = y.copy()

    @precondition(lambda self: "mixed" in self.caps)
    @rule(data=st.data(), x_seed=st.integers(0, 2))
    def forward_mixed(self, data, x_seed):
        x = self._x(x_seed, 3)
        rows = data.draw(
            st.lists(st.sampled_from([None, *sorted(self.adapters)]), min_size=3, max_size=3)
        )
        if data.draw(st.booleans(), label="with an unknown row"):
            bad = [*rows[:2], UNKNOWN]
            call = lambda: self.driver.forward_mixed(x, bad)  # noqa: E731
            expect_error("SW-MIXED-2", self.driver, call, f"mixed rows {bad}", [UNKNOWN])
        with blame("SW-MIXED-1", f"mixed rows {rows}"):
            y = self.driver.forward_mixed(x, rows)
        ads = [None if r is None else self.adapters[r] for r in rows]
        want = reference.mixed_forward(self.layers, x, ads, np.float64)
        expect_close("SW-MIXED-1", y, want, self.dtype, f"mixed rows {rows}")

    @precondition(lambda self: "merge" in self.caps)
    @rule(x_seed=st.integers(0, 2))
    def merge_and_unmerge(self, x_seed):
        x = self._x(x_seed, 3)
        with blame("SW-MERGE-1", f"merge with active {list(self.active)}"):
            before = np.asarray(self.driver.forward(x))
            self.driver.merge()
            merged = self.driver.forward(x)
        want = oracle(self.layers, x, [self.adapters[n] for n in self.active])
        expect_close("SW-MERGE-1", merged, want, self.dtype, "merged forward")
        with blame("SW-MERGE-3", "unmerge"):
            self.driver.unmerge()
            after = self.driver.forward(x)
        if "exact_unmerge" in self.caps:
            expect_equal("SW-MERGE-2", after, before, "forward after merge + unmerge")
        else:
            expect_close("SW-MERGE-3", after, before, self.dtype, "forward after merge + unmerge")
