"""`jaxlora compare` and the serving commands' CLI surface (specs/serving.md, SW-SERVE-12)."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import jaxlora
from jaxlora.cli import main
from jaxlora.generate import generate
from jaxlora.models import LlamaConfig, forward, load_llama
from jaxlora.models.llama import expected_tensor_shapes

HF = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}  # fmt: skip


def _write_checkpoint(directory):
    """A random Llama in the HF layout, written with safetensors alone (no torch)."""
    config = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
    rng = np.random.default_rng(4)
    tensors = {}
    for name, shape in expected_tensor_shapes(config).items():
        value = rng.normal(0.0, 0.3, shape).astype(np.float32)
        if name.endswith(".kernel"):
            name, value = name[: -len(".kernel")] + ".weight", np.ascontiguousarray(value.T)
        tensors[name] = value
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(HF | {"model_type": "llama"}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    _write_checkpoint(root / "llama")
    model = load_llama(root / "llama")
    shapes = model.lora_shapes()
    bank = jaxlora.AdapterBank()
    for i, name in enumerate(["v1", "v2"]):
        cfg = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear",
                                 init_lora_weights=False)  # fmt: skip
        adapter = jaxlora.init_adapter(jax.random.key(i), cfg, shapes)
        adapter = {p: dataclasses.replace(w, b=w.b * (10 + 30 * i)) for p, w in adapter.items()}
        bank = bank.add(name, adapter)
        jaxlora.io.save_peft(root / name, adapter)
    requests = [{"tokens": [1, 2, 3]}, {"tokens": [7, 8, 9], "max_new_tokens": 3, "id": "q"}]
    (root / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    loaded = {n: jaxlora.io.load_peft(root / n)["default"] for n in ("v1", "v2")}
    return root, model, jaxlora.AdapterBank(loaded), requests


@pytest.mark.clause("SW-SERVE-12")
def test_compare_reports_per_request_divergence(files):
    """SW-SERVE-12: tokens equal generate() alone; divergence and KL match the oracle."""
    root, model, bank, requests = files
    out = root / "report.jsonl"
    argv = ["compare", "--model", str(root / "llama"), "--adapter", f"v1={root / 'v1'}",
            "--adapter", f"v2={root / 'v2'}", "--requests", str(root / "req.jsonl"),
            "--out", str(out), "--max-new-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and rows[1]["id"] == "q"
    conformed = jaxlora.conform(bank)
    for req, row in zip(requests, rows, strict=True):
        n = req.get("max_new_tokens", 4)
        lora_a, lora_b = jaxlora.select(conformed, "v1"), jaxlora.select(conformed, "v2")
        ta = generate(model, [req["tokens"]], lora=lora_a, max_new_tokens=n).rows()[0]
        tb = generate(model, [req["tokens"]], lora=lora_b, max_new_tokens=n).rows()[0]
        assert (row["tokens_a"], row["tokens_b"]) == (ta, tb)
        diffs = [j for j in range(n) if ta[j] != tb[j]]
        assert row["first_divergence"] == (diffs[0] if diffs else None)
        assert row["agreement"] == pytest.approx(1 - len(diffs) / n)
        logp = {}
        for name in ("v1", "v2"):
            logits = forward(model, [req["tokens"]], lora=jaxlora.select(conformed, name))
            logp[name] = np.asarray(jax.nn.log_softmax(logits[0, -1]), np.float64)
        kl = float(np.sum(np.exp(logp["v1"]) * (logp["v1"] - logp["v2"])))
        assert row["kl_next_token"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert any(r["kl_next_token"] > 1e-3 for r in rows)  # the adapters do differ


@pytest.mark.clause("SW-SERVE-12")
def test_compare_errors_exit_2(files, capsys):
    """SW-SERVE-12: a malformed line or a wrong --adapter count exits 2 naming the problem."""
    root, *_ = files
    bad = root / "bad.jsonl"
    bad.write_text('{"tokens": [1]}\n{"tokens": [1,\n')
    base = ["compare", "--model", str(root / "llama"), "--requests", str(bad)]
    assert main([*base, "--adapter", f"v1={root / 'v1'}", "--adapter", "base"]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main([*base, "--adapter", "base"]) == 2
    assert "exactly two" in capsys.readouterr().err
    for command in ("serve", "compare"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.clause("SW-SERVE-12")
def test_compare_bad_batch_size_and_ignored_adapter_field(files, tmp_path, capsys):
    """SW-SERVE-12: --batch-size 0 exits 2 naming it; an `adapter` field in a request is
    ignored (generate-format files are accepted); non-UTF-8 and bad ids exit 2 naming the line."""
    root, model, bank, _ = files
    sides = ["--adapter", f"v1={root / 'v1'}", "--adapter", f"v2={root / 'v2'}"]
    base = ["compare", "--model", str(root / "llama"), *sides, "--max-new-tokens", "2"]
    reqs = tmp_path / "req.jsonl"
    reqs.write_text(json.dumps({"tokens": [1, 2], "adapter": "chat"}) + "\n")
    assert main([*base, "--requests", str(reqs), "--batch-size", "0"]) == 2
    assert "--batch-size must be positive, got 0" in capsys.readouterr().err
    out = tmp_path / "out.jsonl"
    assert main([*base, "--requests", str(reqs), "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    lora = jaxlora.select(jaxlora.conform(bank), "v1")
    assert row["tokens_a"] == generate(model, [[1, 2]], lora=lora, max_new_tokens=2).rows()[0]
    for content, words in [
        (b'{"tokens": [1]}\n\xff\n', "line 2: not UTF-8 text"),
        (b'{"tokens": [1]}\n{"tokens": [64]}\n', "line 2: token id 64 outside"),
        (b'{"tokens": [1]}\n{"tokens": []}\n', "line 2: the prompt is empty"),
    ]:
        reqs.write_bytes(content)
        assert main([*base, "--requests", str(reqs)]) == 2
        assert words in capsys.readouterr().err
