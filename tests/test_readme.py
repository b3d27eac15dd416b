"""The README's quick start runs as written and keeps its promises (SW-ACTIVE-4, SW-CONFORM-3)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import jaxlora
from jaxlora import reference

README = Path(__file__).resolve().parent.parent / "README.md"
MIXED_MARKER = "# A mixed batch"


def _quick_start() -> tuple[str, str]:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    # jit caches per function: count this snippet's compilations on a function of its own.
    assert code.count("jax.jit(jaxlora.forward)") == 1
    code = code.replace(
        "jax.jit(jaxlora.forward)", "jax.jit(lambda *a, **k: jaxlora.forward(*a, **k))"
    )
    head, sep, tail = code.partition(MIXED_MARKER)
    assert sep, f"the quick start lost its {MIXED_MARKER!r} comment"
    return head, sep + tail


@pytest.mark.clause("SW-ACTIVE-4", "SW-CONFORM-3", "SW-ACTIVE-2", "SW-MIXED-1")
def test_quick_start_compiles_once_for_every_adapter_and_the_base():
    """SW-ACTIVE-4, SW-CONFORM-3: run verbatim, every conformed adapter and the base model share
    one compilation; the base output is bitwise the model without adapters (SW-ACTIVE-2). The
    mixed batch adds exactly one compilation, reused for another row assignment, and each of
    its rows equals that row's single-adapter forward (SW-MIXED-1)."""
    head, tail = _quick_start()
    scope: dict = {}
    exec(compile(head, str(README), "exec"), scope)
    fwd, model, x, bank = scope["fwd"], scope["model"], scope["x"], scope["bank"]
    assert fwd._cache_size() == 1
    assert np.array_equal(np.asarray(scope["y_base"]), np.asarray(jaxlora.forward(model, x)))
    exec(compile(tail, str(README), "exec"), scope)
    assert fwd._cache_size() == 2
    fwd(model, x, lora=scope["stacked"].route(list(reversed(scope["names"]))))
    assert fwd._cache_size() == 2
    for i, name in enumerate(scope["names"]):
        single = np.asarray(fwd(model, x[i : i + 1], lora=jaxlora.select(bank, name)))
        ok, err, allowed = reference.allclose(scope["y_mixed"][i : i + 1], single, "float32")
        assert ok, (name, err, allowed)


@pytest.mark.clause("SW-TRAIN-5")
def test_training_example_runs_and_saves_peft_adapters(tmp_path, monkeypatch):
    """SW-TRAIN-5: the README's Training example runs as written (two adapters trained in one
    mixed batch, each on its own rows) and writes both adapters to `out/` in PEFT format with
    their configured rank and alpha."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(b for b in blocks if "make_slots_step" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    losses = np.asarray(scope["metrics"]["loss"])
    assert losses.shape == (2,) and np.all(np.isfinite(losses))
    for name in ("sql", "chat"):
        config = jaxlora.io.load_peft_adapter(tmp_path / "out" / name)[1]
        assert (config.r, config.lora_alpha) == (8, 16)
