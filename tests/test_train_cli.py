"""`jaxlora train` end to end on a tiny model and dataset, and the tasks demo (spec SW-TRAIN-7,
SW-TRAIN-8)."""

from __future__ import annotations

import json
import shutil

import pytest

import jaxlora
from jaxlora.cli import main as cli
from jaxlora.commands import demo_tasks
from jaxlora.models import Llama, LlamaConfig
from jaxlora.models.checkpoint import save_llama


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8), seed=0)
    save_llama(root / "llama", model, config_fields={"eos_token_id": 2, "bos_token_id": 1})
    (root / "llama" / "tokenizer.json").write_text(demo_tasks.char_tokenizer().to_str())
    lines = []
    for i, word in enumerate(["abc", "hello", "jax", "lora", "step", "batch", "mix", "row"]):
        lines.append({"prompt": word + "=", "completion": word.upper(), "adapter": "up"})
        lines.append({"prompt": word + "=", "completion": word[::-1], "adapter": "rev"})
        if i % 2:
            lines.append({"text": f"{word} and more"})
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def args(root, out, *extra):
    return [
        "train", "--model", str(root / "llama"), "--data", str(root / "data.jsonl"),
        "--out", str(out), "--rank", "2", "--alpha", "6", "--targets", "q_proj,down_proj",
        "--dropout", "0.1", "--lr", "1e-2", "--batch", "6", "--accumulate", "2", "--quiet",
        *extra,
    ]  # fmt: skip


def files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.clause("SW-TRAIN-7")
def test_train_writes_peft_adapters_and_resume_equals_an_uninterrupted_run(workspace, capsys):
    """SW-TRAIN-7: three adapters (two named, one "default") train together; the output holds
    them in PEFT's layout with r=2, lora_alpha=6 and the asked targets, and the held-out loss
    is reported. Stopping at a checkpoint and `--resume` gives bitwise the files of an
    uninterrupted run from the same seed (so the seed alone fixes the adapters)."""
    whole, parts = workspace / "whole", workspace / "parts"
    assert cli(args(workspace, whole, "--steps", "4", "--save-every", "2")) == 0
    out = capsys.readouterr().out
    assert "step 2: train loss" in out and "eval loss up" in out
    assert cli(args(workspace, parts, "--steps", "2")) == 0
    assert cli(args(workspace, parts, "--steps", "4", "--resume")) == 0
    assert files(whole) == files(parts)
    state = json.loads((whole / "trainer_state.json").read_text())
    assert state["step"] == 4 and [h["step"] for h in state["history"]] == [2, 4]
    bank = jaxlora.io.load_peft(whole)
    assert set(bank.names) == {"default", "up", "rev"}
    for name in bank.names:
        cfg = json.loads(
            (whole / ("" if name == "default" else name) / "adapter_config.json").read_text()
        )
        assert (cfg["r"], cfg["lora_alpha"]) == (2, 6)
        assert sorted(p.rsplit(".", 1)[1] for p in cfg["target_modules"]) == ["down_proj", "q_proj"]
        assert all(float(w.scale) == 3.0 for w in bank[name].values())


@pytest.mark.clause("SW-TRAIN-7")
def test_train_errors_exit_2_naming_the_problem(workspace, capsys, tmp_path):
    """SW-TRAIN-7: a malformed dataset line, a model directory without tokenizer.json,
    `--resume` with another learning rate, an existing --out without --resume and a bad option
    exit 2 with a message naming the line / file / option."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "x"}\n')
    run = args(workspace, tmp_path / "o1", "--steps", "1")
    run[run.index("--data") + 1] = str(bad)
    assert cli(run) == 2
    assert "bad.jsonl line 2: give either `text` or both `prompt` and `completion`" in (
        capsys.readouterr().err
    )
    bare = tmp_path / "bare"
    shutil.copytree(workspace / "llama", bare)
    (bare / "tokenizer.json").unlink()
    run = args(workspace, tmp_path / "o2", "--steps", "1")
    run[run.index("--model") + 1] = str(bare)
    assert cli(run) == 2 and "has no tokenizer.json" in capsys.readouterr().err
    out = tmp_path / "o3"
    assert cli(args(workspace, out, "--steps", "1")) == 0
    capsys.readouterr()
    changed = args(workspace, out, "--steps", "2", "--resume")
    changed[changed.index("--lr") + 1] = "0.5"
    assert cli(changed) == 2
    assert "lr: checkpoint 0.01, now 0.5" in capsys.readouterr().err
    assert cli(args(workspace, out, "--steps", "2")) == 2
    assert "pass --resume to continue" in capsys.readouterr().err
    assert cli(args(workspace, tmp_path / "o4", "--steps", "2", "--batch", "5")) == 2
    assert "--batch 5 must be a multiple of --accumulate 2" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.clause("SW-TRAIN-8")
def test_tasks_demo_trains_saves_serves_and_checks_itself(tmp_path, capsys, monkeypatch):
    """SW-TRAIN-8: the demo trains its adapters (cached under the given directory, PEFT files
    with each task's own rank), prints every held-out row per adapter and the base with one
    compilation, and passes its 90% check; run again from the cache against a wrong answer
    key it exits 1."""
    assert demo_tasks.main(["--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "compiled 1 time(s)" in out and "(base)" in out
    assert "'hello world'  'HELLO WORLD'" in out
    for name, (_, fields) in demo_tasks.TASKS.items():
        cfg = json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"]) == (fields["r"], fields["lora_alpha"])
    wrong = dict(demo_tasks.TASKS)
    wrong["upper"] = (str.lower, wrong["upper"][1])
    monkeypatch.setattr(demo_tasks, "TASKS", wrong)
    assert demo_tasks.main(["--cache-dir", str(tmp_path)]) == 1
    assert "training" not in capsys.readouterr().out  # loaded from the cache


@pytest.mark.clause("SW-TRAIN-7")
@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 1: not a UTF-8 JSON line"),
        ('{"text": "a", "label": 1}', "line 1: unknown fields ['label']"),
        ('{"text": "a", "adapter": 3}', "line 1: `adapter` must be a non-empty string, got 3"),
        ('{"text": 5}', "line 1: `text` must be a string"),
        ('{"prompt": "a", "completion": 2}', "`prompt` and `completion` must be strings"),
        ("[1, 2]", "line 1: expected a JSON object, got list"),
        ("", "no examples"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "give either `text` or both"),
    ],
)
def test_malformed_dataset_lines_exit_2_naming_the_line(workspace, tmp_path, capsys, line, message):
    """SW-TRAIN-7: every kind of malformed dataset line exits 2 with a message naming the line
    (before anything is compiled or written)."""
    data = tmp_path / "d.jsonl"
    data.write_text(line + "\n")
    run = args(workspace, tmp_path / "out", "--steps", "1")
    run[run.index("--data") + 1] = str(data)
    assert cli(run) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.clause("SW-TRAIN-7")
@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--rank", "0", "--rank must be positive, got 0"),
        ("--dropout", "1.0", r"--dropout must be in [0, 1), got 1.0"),
        ("--eval-fraction", "1.5", r"--eval-fraction must be in [0, 1), got 1.5"),
        ("--save-every", "-1", "--save-every must be >= 0, got -1"),
        ("--max-len", "0", "--max-len must be positive, got 0"),
    ],
)
def test_bad_options_exit_2_naming_the_option(workspace, tmp_path, capsys, option, value, message):
    """SW-TRAIN-7: an out-of-range option exits 2 with a message naming it."""
    assert cli(args(workspace, tmp_path / "out", "--steps", "1", option, value)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.clause("SW-TRAIN-7")
def test_token_ids_outside_the_vocabulary_exit_2(workspace, tmp_path, capsys):
    """SW-TRAIN-7: a tokenizer producing ids the model's vocabulary lacks exits 2 naming the
    example and the vocabulary size."""
    small = tmp_path / "small"
    save_llama(small, Llama.random(LlamaConfig(8, 16, 32, 1, 2, 1, 8)))
    shutil.copy(workspace / "llama" / "tokenizer.json", small / "tokenizer.json")
    run = args(workspace, tmp_path / "out", "--steps", "1")
    run[run.index("--model") + 1] = str(small)
    assert cli(run) == 2
    assert "is outside the model's vocabulary [0, 8)" in capsys.readouterr().err
