"""The benchmark scripts run at a tiny size and their reports hold what specs/bench.md says.

No timing is asserted anywhere: only structure, ratios recomputed from the report's own medians,
correctness checks, compile counts and byte counts.
"""

from __future__ import annotations

import importlib.util
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks
from benchmarks import WORKLOADS
from benchmarks._harness import PRESETS, count_compiles, time_interleaved
from benchmarks._setup import TOL_FLOAT32, agreement, tol_check
from benchmarks.plot import plot_series
from benchmarks.summary import markdown_table
from jaxlora.errors import ConfigError

HAS_PEFT = importlib.util.find_spec("peft") is not None
TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Run every workload once at the tiny preset (1 repeat); `(exit status, reports, dir)`."""
    out = tmp_path_factory.mktemp("bench")
    status = benchmarks.main(
        ["--preset", "tiny", "--json-dir", str(out), "--plot", str(out / "mixed.png")]
    )
    loaded = {name: json.loads((out / f"{name}.json").read_text()) for name in WORKLOADS}
    return status, loaded, out


@pytest.mark.clause("SW-BENCH-1")
def test_every_workload_writes_a_complete_report(reports):
    """SW-BENCH-1: each workload writes JSON with machine, versions, sizes, medians, ratios."""
    status, loaded, _ = reports
    assert status == 0
    for name, report in loaded.items():
        assert report["benchmark"] == name
        assert report["machine"]["versions"]["jax"] == jax.__version__
        assert report["machine"]["cpu_count"] >= 1
        assert report["config"]["hidden"] == TINY.hidden
        assert report["results"], name
        for timing in report["timings"].values():
            assert len(timing["samples_s"]) >= TINY.repeats
            assert timing["median_s"] == statistics.median(timing["samples_s"])
        for key, target in report["targets"].items():
            assert target["value"] == report["ratios"].get(key)
    table = markdown_table(loaded)
    for report in loaded.values():
        for key in report["targets"]:
            assert f"`{key}`" in table
    switch = loaded["switch"]
    t = switch["timings"]
    expected = t["select + forward"]["median_s"] / t["fixed adapter forward"]["median_s"]
    assert switch["ratios"]["select_forward_vs_fixed"] == pytest.approx(expected, rel=1e-12)
    mixed = loaded["mixed"]
    counts = sorted({r["distinct"] for r in mixed["results"]})
    assert counts == list(TINY.mixed_counts)
    for row in mixed["results"]:
        base = next(
            r
            for r in mixed["results"]
            if r["distinct"] == row["distinct"] and r["variant"] == "base"
        )
        assert row["vs_base"] == pytest.approx(row["median_ms"] / base["median_ms"], rel=1e-12)


@pytest.mark.clause("SW-BENCH-2")
def test_compared_forwards_agree_and_a_wrong_one_fails(reports, monkeypatch, capsys):
    """SW-BENCH-2: checks hold in every workload; a wrong merged model makes the run exit 1."""
    _, loaded, _ = reports
    expected = {
        "switch": {"conformed_equals_unpadded"} | ({"equals_peft"} if HAS_PEFT else set()),
        "overhead": {"merged_equals_unmerged"} | ({"equals_peft"} if HAS_PEFT else set()),
    }
    for name, keys in expected.items():
        assert set(loaded[name]["checks"]) == keys
    mixed_checks = loaded["mixed"]["checks"]
    assert len(mixed_checks) == len(TINY.mixed_counts) * (len(TINY.methods) + HAS_PEFT)
    assert len(loaded["decode"]["checks"]) == len(TINY.methods)
    for report in loaded.values():
        for check in report["checks"].values():
            assert check["ok"] and check["value"] <= TOL_FLOAT32
    assert not tol_check(agreement(np.ones(3), np.zeros(3)))["ok"]

    import benchmarks.overhead

    monkeypatch.setattr(benchmarks.overhead, "merged_model", lambda model, adapter: model)
    status = benchmarks.main(["--preset", "tiny", "--no-peft", "--only", "overhead"])
    assert status == 1
    assert "merged_equals_unmerged" in capsys.readouterr().out


@pytest.mark.clause("SW-BENCH-3")
def test_compile_counts_are_measured(reports):
    """SW-BENCH-3: one compilation over all switches, and per routing method over all counts."""
    _, loaded, _ = reports
    assert loaded["switch"]["ratios"]["compiles_over_switches"] == 1
    for method in TINY.methods:
        assert loaded["mixed"]["ratios"][f"compiles_{method}"] == 1
    fresh = jax.jit(lambda x: x * 3 + 1)
    ones, zeros = jnp.ones(5), jnp.zeros(5)  # their creation compiles too: keep it outside
    with count_compiles() as n:
        fresh(ones)
        fresh(zeros)
    assert n[0] == 1


@pytest.mark.clause("SW-BENCH-4")
def test_memory_is_counted_against_raw_adapter_bytes(reports):
    """SW-BENCH-4: raw bytes follow from the shapes; the bank and the stack hold just those."""
    _, loaded, _ = reports
    d, m, r = TINY.hidden, TINY.intermediate, TINY.scale_rank
    per_layer = 4 * (d + d) * r + 2 * (d + m) * r + (m + d) * r  # q k v o, gate up, down
    per_adapter = (TINY.layers * per_layer) * 4 + TINY.layers * 7 * 4  # float32 a, b, scale
    rows = loaded["scale"]["results"]
    assert [row["adapters"] for row in rows] == list(TINY.scale_counts)
    for row in rows:
        assert row["raw_MB"] * 2**20 == pytest.approx(row["adapters"] * per_adapter, rel=1e-12)
        assert row["bank_vs_raw"] == pytest.approx(1.0, abs=0.01)
        assert row["stacked_vs_raw"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.clause("SW-BENCH-5")
def test_plot_has_every_line(reports):
    """SW-BENCH-5: a PNG with one line per method, the grouped loop, PEFT and the base."""
    _, loaded, out = reports
    assert (out / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = plot_series(loaded["mixed"])
    expected = {"base", "grouped loop", *(f"routed/{m}" for m in TINY.methods)}
    assert set(series) == expected | ({"peft mixed"} if HAS_PEFT else set())
    assert all([x for x, _ in pts] == list(TINY.mixed_counts) for pts in series.values())
    with pytest.raises(ConfigError, match="mixed"):
        plot_series(loaded["switch"])


@pytest.mark.clause("SW-BENCH-1")
@pytest.mark.parametrize(
    "argv, words",
    [
        (["--only", "nope"], ["nope", "switch", "scale"]),
        (["--only", "switch", "--plot", "x.png"], ["--plot", "mixed"]),
        (["--hidden", "30", "--heads", "4"], ["--hidden 30", "--heads 4"]),
    ],
)
def test_bad_options_exit_2_with_the_reason(argv, words, capsys):
    """SW-BENCH-1: bad options exit 2 naming the problem and the choices."""
    assert benchmarks.main(["--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err


@pytest.mark.clause("SW-BENCH-1")
def test_interleaved_timing_runs_each_variant_repeats_times():
    """SW-BENCH-1: every variant is run warmup + repeats times and its samples are kept."""
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            return jnp.ones(2)

        return fn

    timings = time_interleaved({"a": make("a"), "b": make("b")}, warmup=2, repeats=3)
    assert calls == {"a": 5, "b": 5}
    assert all(len(t.samples_s) == 3 for t in timings.values())


@pytest.mark.clause("SW-BENCH-2")
@pytest.mark.skipif(not HAS_PEFT, reason="needs peft")
def test_e2e_checks_tokens_against_peft_and_times_the_base_ceiling():
    """SW-BENCH-2: the end-to-end benchmark checks jaxlora's tokens equal PEFT's before timing,
    and times the base-model ceiling in the same run (its ratio is what free adapters give)."""
    from benchmarks import e2e

    report = e2e.run(
        hidden=32,
        intermediate=64,
        layers=1,
        heads=2,
        vocab=64,
        batch=4,
        prompt=4,
        new=3,
        adapters=2,
        rank=2,
        repeats=1,
        decode_steps=2,
    )
    assert report["checks"]["rows_equal_peft"] == {"value": 4, "of": 4, "ok": True}
    medians = {r["variant"]: r["median_s"] for r in report["results"]}
    assert set(medians) == {"jaxlora", "peft", "jaxlora-base"}
    ratios = report["ratios"]
    assert ratios["ceiling_base_vs_peft_tokens_per_s"] == pytest.approx(
        medians["peft"] / medians["jaxlora-base"]
    )
    assert ratios["lora_share_of_jaxlora_time"] == pytest.approx(
        (medians["jaxlora"] - medians["jaxlora-base"]) / medians["jaxlora"]
    )
