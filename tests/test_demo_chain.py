"""`jaxlora switch-demo`: the table, the JSON file, and a non-zero exit when a check fails
(spec SW-CONFORM-3, SW-TOL-1, SW-ACTIVE-2)."""

from __future__ import annotations

import json

import pytest

import jaxlora
from jaxlora import reference
from jaxlora.cli import main
from jaxlora.commands import demo


@pytest.mark.clause("SW-CONFORM-3", "SW-TOL-1", "SW-ACTIVE-2")
def test_demo_prints_the_table_and_passes(tmp_path, capsys):
    """SW-CONFORM-3, SW-TOL-1, SW-ACTIVE-2: the demo exits 0, prints one row per adapter (8
    adapters, different ranks and target sets, each within tolerance of the oracle), one
    compilation for all of them, a bit-identical base model, and writes the same as JSON."""
    out_file = tmp_path / "demo.json"
    assert main(["switch-demo", "--seed", "1", "--repeats", "2", "--json", str(out_file)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out_file.read_text())
    rows = results["adapters"]
    assert [r["adapter"] for r in rows] == [a[0] for a in demo.ADAPTERS]
    assert len({tuple(r["rank"]) for r in rows}) == 8
    assert len({tuple(r["targets"]) for r in rows}) >= 7
    for r in rows:
        assert 0 <= r["max_deviation"] <= r["allowed"] and r["ok"]
        assert r["compiles_so_far"] == 1
        line = next(ln for ln in text.splitlines() if ln.startswith(r["adapter"] + " "))
        assert line.rstrip().endswith("ok") and f"{r['max_deviation']:.2e}" in line
    assert results["compile_count"] == 1 and results["trace_count"] == 1
    assert results["base"]["bitwise_equal_to_plain_model"] and results["ok"]
    assert "compile count of the switched forward: 1" in text
    assert "all checks passed" in text


@pytest.mark.clause("SW-CONFORM-3")
def test_demo_fails_without_conform(monkeypatch, capsys):
    """SW-CONFORM-3: if the bank is not conformed, the forward compiles once per shape, and the
    demo reports FAIL and exits 1 (so its compile check can fail)."""
    monkeypatch.setattr(jaxlora, "conform", lambda bank, max_rank=None: bank)
    assert main(["switch-demo", "--repeats", "1"]) == 1
    text = capsys.readouterr().out
    assert "SOME CHECKS FAILED" in text and "FAIL" in text


@pytest.mark.clause("SW-TOL-1")
def test_demo_fails_when_the_oracle_disagrees(monkeypatch, capsys):
    """SW-TOL-1: a deviation above the tolerance makes the row FAIL and the exit status 1."""
    real = reference.chain_forward

    def shifted(layers, x, active, dtype=None):
        y = real(layers, x, active)
        return y + 1.0 if active else y

    monkeypatch.setattr(reference, "chain_forward", shifted)
    assert main(["switch-demo", "--repeats", "1"]) == 1
    text = capsys.readouterr().out
    assert text.count("FAIL") >= 8 and "SOME CHECKS FAILED" in text
