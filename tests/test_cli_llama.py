"""The `jaxlora demo-llama`, `generate` and `inspect` commands (specs/model.md, SW-CLI-*).

None of these tests needs torch, transformers or PEFT: the demo writes its checkpoint and
adapters with jaxlora itself (SW-CLI-1 checks that in a process where they cannot be imported).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import jaxlora
import jaxlora.generate as generate_module
from jaxlora import cli
from jaxlora.commands.demo_llama import DEMO_ADAPTERS, DEMO_CONFIG, DEMO_TOKENS
from jaxlora.commands.generate import FORMAT_HELP
from jaxlora.errors import CheckpointError
from jaxlora.models import load_llama
from jaxlora.types import Active, Routed

MINE = ("demo-llama", "generate", "inspect")


@pytest.fixture(autouse=True)
def only_these_commands(monkeypatch):
    # test these commands independently of the others registered in the CLI.
    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in MINE})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`jaxlora demo-llama` on a fresh cache directory: (root, exit code, stdout)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLORA_CACHE", str(root))
        mp.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in MINE})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(["demo-llama"])
    return root, code, out.getvalue()


@pytest.mark.clause("SW-CLI-1")
def test_llama_demo_on_a_fresh_cache(demo):
    """SW-CLI-1: every row matches its single-adapter generation; decode compiled once."""
    root, code, out = demo
    assert code == 0, out
    assert (root / "llama" / "config.json").is_file()
    assert (root / "adapters" / "adapter_config.json").is_file()
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert len(rows) == 6 and all(line.rstrip().endswith("yes") for line in rows)
    for name in DEMO_ADAPTERS:
        assert any(f" {name} " in line for line in rows), name
    assert any("(base)" in line for line in rows)
    assert re.search(r"decode-step compiles .*: 1$", out, re.M)
    assert re.search(r"tokens/s: \d", out)


@pytest.mark.clause("SW-CLI-1")
def test_llama_demo_reuses_its_cache_and_fails_on_mismatch(demo, monkeypatch, capsys):
    """SW-CLI-1: a second run reuses the files; a row that differs makes the exit status 1."""
    root, _, _ = demo
    stamp = (root / "llama" / "model.safetensors").stat().st_mtime_ns
    real = generate_module.generate

    def corrupt_single_rows(model, prompts, *, lora=None, **kw):
        out = real(model, prompts, lora=lora, **kw)
        if isinstance(lora, Active):  # the single-adapter reference runs
            out.tokens[:, 0] = (out.tokens[:, 0] + 1) % DEMO_CONFIG["vocab_size"]
        return out

    monkeypatch.setattr(generate_module, "generate", corrupt_single_rows)
    monkeypatch.setenv("JAXLORA_CACHE", str(root))
    assert cli.main(["demo-llama"]) == 1  # same shapes as the first run: no new compiles
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and " NO" in captured.out
    assert (root / "llama" / "model.safetensors").stat().st_mtime_ns == stamp


def _write_lines(path, objects):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects))
    return path


@pytest.mark.clause("SW-CLI-2")
def test_generate_command_writes_results_equal_to_generate(demo, tmp_path, capsys):
    """SW-CLI-2: each JSONL result equals jaxlora.generate for that request; the progress line on
    stderr ends with a newline; every result field is documented in `--help`."""
    root, _, _ = demo
    requests = [
        {"tokens": [1, 17, 42], "adapter": "chat", "max_new_tokens": 5, "id": "a"},
        {"tokens": [1, 5], "max_new_tokens": 3},
        {"tokens": [1, 88, 3, 61], "adapter": "rs", "max_new_tokens": 6},
        {"tokens": [1, 33], "adapter": "chat"},
    ]
    _write_lines(tmp_path / "in.jsonl", requests)
    adapters = {"chat": root / "adapters", "rs": root / "adapters" / "wide-rs"}
    argv = ["generate", "--model", str(root / "llama"), "--requests", str(tmp_path / "in.jsonl")]
    argv += ["--out", str(tmp_path / "out.jsonl"), "--batch-size", "3", "--max-new-tokens", "4"]
    for name, directory in adapters.items():
        argv += ["--adapter", f"{name}={directory}"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.endswith("] 4/4 requests\n")
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    documented = FORMAT_HELP.split("results (--out):")[1]
    assert all(re.search(rf"^  {key} ", documented, re.M) for r in results for key in r)
    model = load_llama(root / "llama")
    bank = jaxlora.AdapterBank()
    for name, directory in adapters.items():
        bank = bank.add(name, jaxlora.io.load_peft_adapter(directory)[0])
    # One mixed batch as the peer: rows are independent (SW-GEN-1), so a row generated to 6
    # tokens and cut at the request's limit is that request's generation.
    expected = generate_module.generate(
        model,
        [r["tokens"] for r in requests],
        lora=jaxlora.stack(jaxlora.conform(bank)).route([r.get("adapter") for r in requests]),
        max_new_tokens=6,
        stop_tokens=[DEMO_TOKENS["eos_token_id"]],
    ).rows()
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        assert res["index"] == i, res
        assert res["tokens"] == expected[i][: req.get("max_new_tokens", 4)], (req, res)
        assert res["adapter"] == req.get("adapter") and res["prompt_tokens"] == len(req["tokens"])
    assert results[0]["id"] == "a" and "id" not in results[1]


@pytest.mark.clause("SW-CLI-2")
@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{not json", "line 2: not valid JSON"),
        ({"tokens": [1], "adapter": "nope"}, "line 2: unknown adapter 'nope'"),
        ({"text": "hello"}, "line 2: `text` needs a tokenizer"),
        ({"tokens": "1 2"}, "line 2: `tokens` must be a list of ints"),
        ({"tokens": [1], "max_new_tokens": 0}, "line 2: `max_new_tokens` must be a positive"),
        ({"tokens": [1], "adapter": []}, "line 2: `adapter` must be a name (a string) or null"),
        ({"tokens": [1], "adapter": 3}, "line 2: `adapter` must be a name (a string) or null"),
        ({"tokens": []}, "line 2: the prompt is empty"),
        ({"tokens": [1, 128]}, "line 2: token id 128 outside the model's vocabulary [0, 128)"),
        ({"tokens": [-1]}, "line 2: token id -1 outside the model's vocabulary"),
    ],
)
def test_generate_command_rejects_bad_lines(demo, tmp_path, capsys, line, words):
    """SW-CLI-2: a malformed request fails with status 2, naming the line; nothing written."""
    root, _, _ = demo
    _write_lines(tmp_path / "in.jsonl", [{"tokens": [1, 2]}, line])
    argv = [
        "generate",
        "--model",
        str(root / "llama"),
        "--requests",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(tmp_path / "out.jsonl"),
    ]
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    assert cli.main([*argv, "--adapter", "oops"]) == 2
    assert "--adapter expects NAME=DIR, got 'oops'" in capsys.readouterr().err


def _generate_argv(root, requests, out, *extra):
    argv = ["generate", "--model", str(root / "llama"), "--requests", str(requests)]
    return [*argv, "--out", str(out), *extra]


@pytest.mark.clause("SW-CLI-2")
def test_generate_command_errors_name_the_request_line(demo, tmp_path, capsys):
    """SW-CLI-2: an empty or out-of-vocabulary prompt names its line, not its row in a batch."""
    root, _, _ = demo
    good = {"tokens": [1, 2]}
    for bad, words in [
        ({"tokens": []}, "line 4: the prompt is empty"),
        ({"tokens": [1, 500]}, "line 4: token id 500 outside"),
    ]:
        _write_lines(tmp_path / "in.jsonl", [good, good, good, bad])
        argv = _generate_argv(
            root, tmp_path / "in.jsonl", tmp_path / "o.jsonl", "--batch-size", "2"
        )
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "prompt 1" not in err, err
        assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.clause("SW-CLI-2")
def test_generate_command_refuses_bad_files_and_options(demo, tmp_path, capsys):
    """SW-CLI-2: non-UTF-8 input, a non-string `text`, a NaN temperature and batch size 0 exit 2."""
    root, _, _ = demo
    out = tmp_path / "o.jsonl"
    requests = tmp_path / "in.jsonl"
    requests.write_bytes(b'{"tokens": [1]}\n{"tokens": [1], "id": "\xff\xfe"}\n')
    assert cli.main(_generate_argv(root, requests, out)) == 2
    err = capsys.readouterr().err
    assert f"{requests} line 2: not UTF-8 text" in err and "Traceback" not in err
    _write_lines(requests, [{"tokens": [1]}])
    for extra, words in [
        (
            ["--temperature", "nan"],
            "--temperature must be a finite number >= 0 (0 = greedy), got nan",
        ),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    ]:
        assert cli.main(_generate_argv(root, requests, out, *extra)) == 2
        assert words in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.clause("SW-CLI-2")
def test_generate_command_text_must_be_a_string(tmp_path):
    """SW-CLI-2: with a tokenizer, a `text` that is not a string is refused naming the line."""
    from jaxlora.commands.generate import RequestError, read_requests

    _write_lines(tmp_path / "in.jsonl", [{"text": "hi"}, {"text": ["hi"]}])
    tokenizer = lambda text: {"input_ids": [1] + [ord(c) % 50 for c in text]}  # noqa: E731
    with pytest.raises(RequestError, match=r"line 2: `text` must be a string, got list"):
        read_requests(tmp_path / "in.jsonl", set(), 4, tokenizer, vocab_size=50)
    assert issubclass(RequestError, jaxlora.errors.ConfigError)


@pytest.mark.clause("SW-CLI-1")
@pytest.mark.parametrize("n", ["0", "1"])
def test_llama_demo_needs_two_new_tokens(demo, monkeypatch, capsys, n):
    """SW-CLI-1: --max-new-tokens below 2 exits 2 with a message instead of a traceback."""
    root, _, _ = demo
    monkeypatch.setenv("JAXLORA_CACHE", str(root))
    assert cli.main(["demo-llama", "--max-new-tokens", n]) == 2
    assert f"--max-new-tokens must be at least 2 (the decode step only runs from the second " \
        f"token on), got {n}" in capsys.readouterr().err  # fmt: skip


@pytest.mark.clause("SW-CLI-1")
def test_llama_demo_twice_in_one_process(demo, monkeypatch, capsys):
    """SW-CLI-1: a second demo in the same process (step already compiled) still passes, adding
    0 decode compiles, and a recompiling second batch fails."""
    root, _, _ = demo
    monkeypatch.setenv("JAXLORA_CACHE", str(root))
    assert cli.main(["demo-llama"]) == 0
    assert re.search(r"decode-step compiles .*: 0$", capsys.readouterr().out, re.M)
    real = generate_module.generate
    calls = []

    def recompile_second_batch(model, prompts, *, lora=None, **kw):
        calls.append(lora)
        if len(calls) == 2:  # the second mixed batch: force a new decode-step shape (a
            assert isinstance(lora, Routed)  # cache length past generate's buckets of 32)
            kw["max_new_tokens"] += 64
        return real(model, prompts, lora=lora, **kw)

    monkeypatch.setattr(generate_module, "generate", recompile_second_batch)
    assert cli.main(["demo-llama"]) == 1
    assert "recompiled" in capsys.readouterr().err


@pytest.mark.clause("SW-CLI-3")
def test_inspect_lists_every_adapter(demo, tmp_path, capsys):
    """SW-CLI-3: ranks, alphas, scales and parameter counts follow the demo's adapter specs
    (save_peft writes each layer's scale as `alpha = scale * rank` with use_rslora false)."""
    root, _, _ = demo
    assert cli.main(["inspect", str(root / "adapters"), "--model", str(root / "llama")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(table) == set(DEMO_ADAPTERS)
    shapes = load_llama(root / "llama").lora_shapes()
    for name, spec in DEMO_ADAPTERS.items():
        cfg = jaxlora.LoraConfig(**{k: v for k, v in spec.items() if k != "target_modules"})
        targets = spec["target_modules"]
        paths = [p for p in shapes if targets == "all-linear" or p.rsplit(".", 1)[1] in targets]
        ranks = sorted({cfg.rank_for(p) for p in paths})
        alphas = sorted({cfg.scale_for(p) * cfg.rank_for(p) for p in paths})
        params = sum((shapes[p][0] + shapes[p][1]) * cfg.rank_for(p) for p in paths)
        scales = sorted({round(cfg.scale_for(p), 6) for p in paths})
        _, _, rank_col, alpha_col, scale_col, param_col, dtype, loads = table[name][:8]
        assert rank_col == ",".join(map(str, ranks))
        assert [float(a) for a in alpha_col.split(",")] == pytest.approx(alphas, rel=1e-5)
        assert [float(s) for s in scale_col.split(",")] == pytest.approx(scales, rel=1e-5)
        assert int(param_col) == params and dtype == "float32" and loads == "yes"
    assert math.isclose(float(table["wide-rs"][4]), 4 / math.sqrt(8), rel_tol=1e-5)


@pytest.mark.clause("SW-CLI-3")
def test_inspect_reports_adapters_that_do_not_load(demo, tmp_path, capsys):
    """SW-CLI-3: a corrupt adapter is listed with the reason and the exit status is 1."""
    root, _, _ = demo
    copy = shutil.copytree(root / "adapters", tmp_path / "adapters")
    (copy / "mlp-only" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    assert cli.main(["inspect", str(copy)]) == 1
    out = capsys.readouterr().out
    bad = next(line for line in out.splitlines() if line.startswith("mlp-only"))
    assert "NO:" in bad and "adapter_model.safetensors" in bad
    assert sum(line.rstrip().endswith("layers)") for line in out.splitlines()) == 3


@pytest.mark.clause("SW-CLI-4")
@pytest.mark.parametrize("command", MINE)
def test_every_command_has_help(command, capsys):
    """SW-CLI-4: `--help` prints the usage and exits 0."""
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: jaxlora {command}" in capsys.readouterr().out


BLOCKED = ("torch", "transformers", "peft")
NO_TORCH_DEMO = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked by the test")

sys.meta_path.insert(0, Blocked())
from jaxlora import cli
code = cli.main(["demo-llama"])
print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}))
sys.exit(code)
"""


@pytest.mark.clause("SW-CLI-1")
def test_llama_demo_needs_no_torch_transformers_or_peft(tmp_path):
    """SW-CLI-1: in a process where torch, transformers and peft cannot be imported, `jaxlora
    demo` writes its checkpoint and adapters on a fresh cache and every row matches."""
    env = os.environ | {"JAXLORA_CACHE": str(tmp_path / "cache")}
    cache = jax.config.jax_compilation_cache_dir  # the tests' cache (tests/conftest.py)
    if cache:
        env |= {"JAX_COMPILATION_CACHE_DIR": cache}
        env |= {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH_DEMO],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "all rows match their single-adapter generation" in proc.stdout
    assert "imported: []" in proc.stdout
    config = json.loads((tmp_path / "cache" / "llama" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["eos_token_id"] == DEMO_TOKENS["eos_token_id"]


@pytest.mark.clause("SW-CLI-1")
def test_llama_demo_refuses_a_foreign_cache_directory(tmp_path, capsys):
    """SW-CLI-1: a cache whose `llama/` holds other files is not replaced: exit 2, a message
    naming the directory and the fix, the files untouched."""
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "notes.txt").write_text("mine")
    assert cli.main(["demo-llama", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the demo files under {tmp_path}" in err
    assert "refusing to replace it" in err and "--cache-dir or $JAXLORA_CACHE" in err
    assert "Traceback" not in err
    assert [p.name for p in (tmp_path / "llama").iterdir()] == ["notes.txt"]
    assert issubclass(CheckpointError, jaxlora.errors.JaxLoraError)


@pytest.mark.clause("SW-CLI-2")
def test_generate_progress_line_ends_before_an_error(demo, tmp_path, monkeypatch, capsys):
    """SW-CLI-2: when a batch fails mid-run the progress line still ends with a newline, so
    the error message starts on its own line; exit 2, nothing written."""
    root, _, _ = demo
    _write_lines(tmp_path / "in.jsonl", [{"tokens": [1, 2]}] * 4)
    real, calls = generate_module.generate, []

    def fail_second_batch(model, prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise jaxlora.errors.ConfigError("injected failure in batch 2")
        return real(model, prompts, **kw)

    monkeypatch.setattr(generate_module, "generate", fail_second_batch)
    argv = _generate_argv(root, tmp_path / "in.jsonl", tmp_path / "o.jsonl", "--batch-size", "2")
    assert cli.main([*argv, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "] 2/4 requests\njaxlora generate: error: injected failure in batch 2" in err, err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.clause("SW-CLI-2")
def test_generate_help_documents_the_jsonl_formats(tmp_path, capsys):
    """SW-CLI-2: `jaxlora generate --help` shows the request and result formats, and the
    request example it shows is a valid request."""
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert FORMAT_HELP in out
    for field in ("tokens", "text", "adapter", "max_new_tokens", "id", "index", "prompt_tokens"):
        assert re.search(rf"^  {field} ", out, re.M), field
    example = re.search(r"^  e\.g\. (\{.*\})$", out, re.M).group(1)
    from jaxlora.commands.generate import read_requests

    _write_lines(tmp_path / "in.jsonl", [example])
    (request,) = read_requests(tmp_path / "in.jsonl", {"chat"}, 4, vocab_size=64)
    assert request == {"tokens": [1, 17, 42], "adapter": "chat", "max_new_tokens": 8, "id": "q1"}


def _bare_adapters(root: Path, target: Path) -> Path:
    """The demo's default adapter under a bare LlamaModel's paths (`layers.0...`)."""
    adapter, _ = jaxlora.io.load_peft_adapter(root / "adapters")
    jaxlora.io.save_peft(target, {p.removeprefix("model."): w for p, w in adapter.items()})
    return target


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.clause("SW-CLI-3")
def test_inspect_key_map_advice_names_options_that_exist(demo, tmp_path, capsys):
    """SW-CLI-3: an adapter under other module names is reported with advice; every command
    option the advice names exists in that command's `--help`, and following it (`--key-map
    layers.=model.layers.`) makes the adapter fit."""
    root, _, _ = demo
    bare = _bare_adapters(root, tmp_path / "bare")
    argv = ["inspect", str(bare), "--model", str(root / "llama")]
    assert cli.main(argv) == 1
    row = capsys.readouterr().out.splitlines()[1]
    assert row.startswith("default") and "NO:" in row and "layers.0.self_attn.q_proj" in row
    options = re.findall(r"`(--[a-z-]+) [A-Z=]+`", row)
    commands = re.findall(r"`jaxlora (\w+)`", row)
    assert options == ["--key-map"] and sorted(commands) == ["generate", "inspect"]
    for command in commands:
        assert "--key-map OLD=NEW" in _help(command, capsys)
    assert cli.main([*argv, "--key-map", "layers.=model.layers."]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert row.split()[-3:] == ["yes", "(4", "layers)"]
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--key-map", "layers."])
    assert info.value.code == 2
    assert "expected OLD=NEW (a path prefix and its replacement" in capsys.readouterr().err


@pytest.mark.clause("SW-CLI-2")
def test_generate_key_map_renames_adapter_paths(demo, tmp_path, capsys):
    """SW-CLI-2: `--key-map` lets `generate` load an adapter saved under other module names; the
    results equal those of the same adapter under the model's names."""
    root, _, _ = demo
    bare = _bare_adapters(root, tmp_path / "bare")
    _write_lines(tmp_path / "in.jsonl", [{"tokens": [1, 17, 42], "adapter": "a"}])
    argv = _generate_argv(root, tmp_path / "in.jsonl", tmp_path / "o.jsonl", "--quiet")
    assert cli.main([*argv, "--adapter", f"a={bare}"]) == 2
    assert "`--key-map OLD=NEW` of `jaxlora inspect` and `jaxlora generate`" in (
        capsys.readouterr().err
    )
    assert cli.main([*argv, "--adapter", f"a={bare}", "--key-map", "layers.=model.layers."]) == 0
    renamed = (tmp_path / "o.jsonl").read_text()
    assert cli.main([*argv, "--adapter", f"a={root / 'adapters'}"]) == 0
    assert renamed == (tmp_path / "o.jsonl").read_text()
