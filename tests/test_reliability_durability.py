"""Saves interrupted at any point lose nothing; saved banks round-trip bitwise
(specs/reliability.md SW-DURABLE-1..2; the checkpoint writer and `atomic_write` too, SW-IO-13).

Three ways to interrupt `save_peft` over an existing adapter directory:
- an exception injected at every I/O step (the save's own cleanup then runs);
- a simulated crash at every I/O step (that step and every later one do nothing, as if the
  process had died there);
- a real child process saving in a loop, killed with SIGKILL at random moments.
After each, the directory must hold exactly (bitwise, file by file) the previous adapters or the
complete new ones, and load. A deliberately non-atomic save fails the same check.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora.io import (
    _atomic,
    _checkpoint,
    _save,
    atomic_write,
    load_peft,
    save_hf_checkpoint,
    save_peft,
)

HERE = Path(__file__).resolve().parent
KILL_ROUNDS = int(os.environ.get("JAXLORA_KILL_ROUNDS", "3"))


def make_bank(seed: int, dtypes=("float32", "bfloat16", "float16")) -> jaxlora.AdapterBank:
    """A bank with a root adapter and two named ones, mixed dtypes and ranks; factor values are
    random bit patterns (NaN payloads, infinities, subnormals, -0.0 included)."""
    rng = np.random.default_rng(seed)
    bank = jaxlora.AdapterBank()
    for i, name in enumerate(["default", "math", "code"]):
        dtype = jnp.dtype(dtypes[i % len(dtypes)])
        bits = np.dtype(f"uint{8 * dtype.itemsize}")
        adapter = {}
        for j, (d_in, d_out) in enumerate([(8, 6), (6, 6)]):
            r = 1 + (i + j) % 3
            a = rng.integers(0, np.iinfo(bits).max, (d_in, r), dtype=bits, endpoint=True)
            b = rng.integers(0, np.iinfo(bits).max, (r, d_out), dtype=bits, endpoint=True)
            adapter[f"model.layers.{j}.proj"] = jaxlora.LoraWeights(
                jnp.asarray(a.view(dtype)),
                jnp.asarray(b.view(dtype)),
                jnp.asarray(float(rng.uniform(0.1, 4.0)), jnp.float32),
            )
        bank = bank.add(name, adapter)
    return bank


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes); {} when it does not exist."""
    if not directory.exists():
        return {}
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(f"uint{8 * x.dtype.itemsize}")


def assert_same_bank(loaded: jaxlora.AdapterBank, saved: jaxlora.AdapterBank) -> None:
    assert sorted(loaded.names) == sorted(saved.names)
    for name in saved.names:
        assert sorted(loaded[name]) == sorted(saved[name])
        for path, w in saved[name].items():
            got = loaded[name][path]
            for field in ("a", "b", "scale"):
                want, have = getattr(w, field), getattr(got, field)
                assert have.dtype == want.dtype, (name, path, field)
                np.testing.assert_array_equal(bits(have), bits(want), err_msg=f"{name} {path}")


OLD, NEW = make_bank(1), make_bank(2)


@pytest.fixture(scope="module")
def expected_trees(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("expected")
    save_peft(root / "old", OLD)
    save_peft(root / "new", NEW)
    return {"old": snapshot(root / "old"), "new": snapshot(root / "new")}


# -- SW-DURABLE-2 -------------------------------------------------------------------------------


@pytest.mark.clause("SW-DURABLE-2")
@given(
    seed=st.integers(0, 2**32 - 1),
    dtypes=st.lists(st.sampled_from(["float32", "bfloat16", "float16"]), min_size=1, max_size=3),
)
def test_saved_bank_round_trips_bitwise(seed, dtypes):
    """SW-DURABLE-2: a bank of random bit patterns (NaN payloads, Inf, subnormals, -0.0) in
    float32/bfloat16/float16 comes back from save_peft + load_peft with the same names and paths,
    bitwise-identical factors of the same dtype, and the same float32 scales."""
    bank = make_bank(seed, tuple(dtypes))
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(Path(tmp) / "bank", bank)
        assert_same_bank(load_peft(Path(tmp) / "bank"), bank)


# -- fault injection ----------------------------------------------------------------------------


class Injected(OSError):
    """The failure a test injects into one I/O step of a save."""


class FaultPlan:
    """Counts the I/O steps of a save; from step `at` on, fails them.

    mode "raise": step `at` raises, later steps run normally (the save's own cleanup runs).
    mode "crash": step `at` and every later step raise without doing anything: the files are
    left exactly as a process killed before step `at` would leave them.
    """

    def __init__(self, at: int | None = None, mode: str = "raise"):
        self.at, self.mode, self.steps = at, mode, []

    def wrap(self, name: str, fn):
        def step(*args, **kwargs):
            self.steps.append(name)
            n = len(self.steps)
            if self.at is not None and (n == self.at or (self.mode == "crash" and n > self.at)):
                raise Injected(f"injected failure at step {n} ({name})")
            return fn(*args, **kwargs)

        return step


def install(monkeypatch, plan: FaultPlan, modules=(_save, _atomic)) -> None:
    """Route every file-system step of `modules` (writes, fsyncs, renames, the directory
    exchange, removals) through `plan`: the writer's own steps and the atomic-write helper's."""
    real_json, real_os, real_shutil = json, os, shutil

    class Json:
        dump = staticmethod(plan.wrap("json.dump", real_json.dump))

        def __getattr__(self, name):
            return getattr(real_json, name)

    class Os:
        replace = staticmethod(plan.wrap("os.replace", real_os.replace))
        fsync = staticmethod(plan.wrap("os.fsync", real_os.fsync))

        def __getattr__(self, name):
            return getattr(real_os, name)

    class Shutil:
        rmtree = staticmethod(plan.wrap("shutil.rmtree", real_shutil.rmtree))

    for module in modules:
        steps = {"json": Json(), "os": Os(), "shutil": Shutil}
        for name in ("write_tensors", "_exchange"):
            if hasattr(module, name):
                steps[name] = plan.wrap(name, getattr(module, name))
        for name, value in steps.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, value)


def interrupted_save_outcomes(monkeypatch, tmp_path, mode: str, save=save_peft) -> list[str]:
    """Save NEW over OLD once per I/O step, failing at that step; returns per step which tree
    the target holds afterwards ('old' / 'new' / 'DAMAGED ...')."""
    trees = {}
    for label, bank in (("old", OLD), ("new", NEW)):
        save_peft(tmp_path / label, bank)
        trees[label] = snapshot(tmp_path / label)
    save_peft(tmp_path / "count", OLD)
    with monkeypatch.context() as m:
        counter = FaultPlan()
        install(m, counter)
        save(tmp_path / "count", NEW)  # the steps of a save over an existing directory
    assert len(counter.steps) >= 4, counter.steps
    outcomes = []
    for at in range(1, len(counter.steps) + 1):
        target = tmp_path / f"target-{mode}-{at}"
        save_peft(target, OLD)
        with monkeypatch.context() as m:
            install(m, FaultPlan(at, mode))
            with contextlib.suppress(Injected):
                save(target, NEW)
        state = snapshot(target)
        label = next((k for k, tree in trees.items() if state == tree), None)
        if label is None:
            outcomes.append(f"DAMAGED at step {at} ({counter.steps[at - 1]}): {sorted(state)}")
            continue
        assert_same_bank(load_peft(target), OLD if label == "old" else NEW)
        outcomes.append(label)
    return outcomes


def non_atomic_save(path, adapters):
    """BROKEN on purpose: writes each adapter's files straight into the target directory."""
    target = Path(path)
    for name, adapter in adapters.items():
        tensors, config = _save._adapter_files(adapter, lambda p: p, None, {}, name)
        _save._write_adapter(target if name == "default" else target / name, tensors, config)


@pytest.mark.clause("SW-DURABLE-1")
def test_exception_at_any_step_leaves_old_or_new(monkeypatch, tmp_path):
    """SW-DURABLE-1: an exception injected at each I/O step of save_peft (every tensor write,
    config write, fsync, rename, removal) leaves the previous adapters bitwise and loadable, or
    the complete new ones; no temporary directory is left behind. A non-atomic save fails the
    same check."""
    outcomes = interrupted_save_outcomes(monkeypatch, tmp_path, "raise")
    assert all(o in ("old", "new") for o in outcomes), outcomes
    assert "old" in outcomes
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert leftovers == [], leftovers

    broken = interrupted_save_outcomes(monkeypatch, tmp_path / "broken", "raise", non_atomic_save)
    assert any(o.startswith("DAMAGED") for o in broken), broken


@pytest.mark.clause("SW-DURABLE-1")
def test_crash_at_any_step_leaves_old_or_new(monkeypatch, tmp_path):
    """SW-DURABLE-1: a crash simulated at each I/O step (that step and all later ones do
    nothing, as in a killed process) leaves the previous adapters bitwise and loadable, or the
    complete new ones."""
    outcomes = interrupted_save_outcomes(monkeypatch, tmp_path, "crash")
    assert all(o in ("old", "new") for o in outcomes), outcomes


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_reliability_durability import NEW, OLD
from jaxlora.io import save_peft
target = {target!r}
save_peft(target, NEW)
print("ready", flush=True)
while True:
    save_peft(target, OLD)
    save_peft(target, NEW)
"""


@pytest.mark.clause("SW-DURABLE-1")
def test_sigkill_mid_save_leaves_old_or_new(tmp_path, expected_trees):
    """SW-DURABLE-1: a child process saving two banks alternately over one directory is killed
    with SIGKILL at random moments; afterwards the directory holds exactly one of the two banks
    (bitwise, file by file) and loads."""
    rng = random.Random(0)
    seen = []
    for round_ in range(KILL_ROUNDS):
        target = tmp_path / f"round-{round_}"
        save_peft(target, OLD)
        script = CHILD.format(tests=str(HERE), target=str(target))
        child = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            line = child.stdout.readline()
            assert line.strip() == b"ready", child.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        state = snapshot(target)
        label = next((k for k, tree in expected_trees.items() if state == tree), None)
        assert label is not None, f"round {round_}: target holds {sorted(state)}"
        assert_same_bank(load_peft(target), OLD if label == "old" else NEW)
        seen.append(label)
    assert len(seen) == KILL_ROUNDS


# -- SW-IO-13: the other writers use the same atomic helper ------------------------------------

OLD_CKPT = ({"w.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"model_type": "toy"})
NEW_CKPT = (
    {"w.weight": -np.ones((3, 2), np.float32), "b": np.zeros(3, np.float16)},
    {"model_type": "toy", "version": 2},
)


@pytest.mark.clause("SW-IO-13")
@pytest.mark.parametrize("mode", ["raise", "crash"])
def test_interrupted_checkpoint_write_leaves_old_or_new(monkeypatch, tmp_path, mode):
    """SW-IO-13: save_hf_checkpoint over an existing checkpoint, interrupted at each I/O step
    (tensor write, fsyncs, the swap, removals) by an exception or a simulated crash, leaves the
    previous checkpoint or the complete new one, file by file bitwise."""
    trees = {}
    for label, ckpt in (("old", OLD_CKPT), ("new", NEW_CKPT)):
        save_hf_checkpoint(tmp_path / label, *ckpt)
        trees[label] = snapshot(tmp_path / label)
    save_hf_checkpoint(tmp_path / "count", *OLD_CKPT)
    counter = FaultPlan()
    with monkeypatch.context() as m:
        install(m, counter, modules=(_checkpoint, _atomic))
        save_hf_checkpoint(tmp_path / "count", *NEW_CKPT)
    assert {"write_tensors", "os.fsync", "_exchange", "shutil.rmtree"} <= set(counter.steps)
    outcomes = []
    for at in range(1, len(counter.steps) + 1):
        target = tmp_path / f"target-{at}"
        save_hf_checkpoint(target, *OLD_CKPT)
        with monkeypatch.context() as m:
            install(m, FaultPlan(at, mode), modules=(_checkpoint, _atomic))
            with contextlib.suppress(Injected):
                save_hf_checkpoint(target, *NEW_CKPT)
        state = snapshot(target)
        outcomes.append(next((k for k, tree in trees.items() if state == tree), "DAMAGED"))
    assert set(outcomes) <= {"old", "new"} and "old" in outcomes, outcomes


@pytest.mark.clause("SW-IO-13")
@pytest.mark.parametrize("mode", ["raise", "crash"])
def test_interrupted_atomic_write_leaves_old_or_new(monkeypatch, tmp_path, mode):
    """SW-IO-13: atomic_write (the CLI's output files) interrupted at each step (fsync of the
    file, the rename, fsync of the directory) leaves the old content or the new one."""
    target = tmp_path / "out.jsonl"
    counter = FaultPlan()
    with monkeypatch.context() as m:
        install(m, counter, modules=(_atomic,))
        atomic_write(target, "new\n")
    assert counter.steps == ["os.fsync", "os.replace", "os.fsync"], counter.steps
    for at in range(1, len(counter.steps) + 1):
        atomic_write(target, "old\n")
        with monkeypatch.context() as m:
            install(m, FaultPlan(at, mode), modules=(_atomic,))
            with contextlib.suppress(Injected):
                atomic_write(target, "new\n")
        assert target.read_text() == ("old\n" if at <= 2 else "new\n"), at
    if mode == "raise":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
