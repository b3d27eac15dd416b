"""The one atomic-write helper (specs/io.md SW-IO-13): what it fsyncs, how it swaps, that every
writer in `jaxlora/` goes through it, and that the on-disk file names are defined once.

Interrupting the writers at every I/O step is in tests/test_reliability_durability.py."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from jaxlora.io import _atomic, _names, atomic_directory, atomic_write, save_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LINUX_FDS = Path("/proc/self/fd").is_dir()


@pytest.fixture
def fsynced(monkeypatch):
    """The paths `os.fsync` is called on, in order (resolved through /proc/self/fd)."""
    if not LINUX_FDS:
        pytest.skip("needs /proc/self/fd to name the fsynced files")
    calls: list[str] = []
    real = os.fsync

    def record(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


@pytest.mark.clause("SW-IO-13")
def test_atomic_write_fsyncs_the_file_then_its_directory(tmp_path, fsynced):
    """SW-IO-13: the data goes to a temporary file next to the target, which is fsynced, renamed
    over the target, then the directory is fsynced; the file gets the umask's permissions."""
    target = tmp_path / "results.jsonl"
    target.write_text("old\n")
    atomic_write(target, '{"index": 0}\n')
    assert target.read_text() == '{"index": 0}\n'
    tmp_file, directory = fsynced
    assert Path(tmp_file).parent == tmp_path and Path(tmp_file).name.startswith(
        ".results.jsonl.tmp-"
    )
    assert directory == str(tmp_path)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference", "results.jsonl"]


@pytest.mark.clause("SW-IO-13")
def test_atomic_directory_fsyncs_the_whole_tree_before_the_swap(tmp_path, fsynced):
    """SW-IO-13: every file and directory of the new tree is fsynced (under its temporary name)
    before it replaces the target; the parent directory is fsynced last."""
    target = tmp_path / "bank"
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.json").write_text("{}")
        (tmp / "sub" / "b.bin").write_bytes(b"\0")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "a.json",
        "sub",
        "sub/b.bin",
    ]
    *tree, parent = fsynced
    assert parent == str(tmp_path)
    staged = Path(tree[-1])
    assert staged.parent == tmp_path and staged.name.startswith(".bank.tmp-")
    assert {str(Path(p).relative_to(staged)) for p in tree} == {".", "a.json", "sub", "sub/b.bin"}
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]


@pytest.mark.clause("SW-IO-13")
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_replaces_or_keeps_the_target(tmp_path, monkeypatch, exchange):
    """SW-IO-13: on success the new tree replaces the old one whole (by renameat2
    RENAME_EXCHANGE, or by two renames where the OS lacks it); an exception in the block leaves
    the old tree and no temporary directory."""
    if not exchange:
        monkeypatch.setattr(_atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("half-way")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.clause("SW-IO-13")
def test_checkpoint_writer_goes_through_the_helper(tmp_path, fsynced):
    """SW-IO-13: save_hf_checkpoint fsyncs both files and the staged directory, then the parent."""
    save_hf_checkpoint(tmp_path / "ck", {"w": np.ones(2, np.float32)}, {"model_type": "x"})
    names = [Path(p).name for p in fsynced]
    assert sorted(names[:2]) == [_names.MODEL_CONFIG_NAME, _names.MODEL_WEIGHTS_NAME]
    assert names[2].startswith(".ck.tmp-") and fsynced[3] == str(tmp_path)


def _code_nodes(path: Path):
    """The AST nodes of `path` outside docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            docstrings.add(id(first.value))
    return [n for n in ast.walk(tree) if id(n) not in docstrings]


LIBRARY = sorted((ROOT / "jaxlora").rglob("*.py"))
#: module -> the functions that rename files or make temporary ones
RENAMING = {
    "os": {"replace", "rename", "renames"},
    "tempfile": {"mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryDirectory"},
    "shutil": {"move"},
}


def _renames(node: ast.AST) -> str | None:
    """`os.replace(...)`-like calls, `<path>.rename(...)` and `from os import replace`."""
    if isinstance(node, ast.ImportFrom) and node.module in RENAMING:
        hits = [a.name for a in node.names if a.name in RENAMING[node.module]]
        return f"from {node.module} import {', '.join(hits)}" if hits else None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    owner = node.func.value
    module = owner.id if isinstance(owner, ast.Name) else None
    if node.func.attr in RENAMING.get(module, ()) or node.func.attr == "rename":
        return ast.unparse(node.func)
    return None


@pytest.mark.clause("SW-IO-13")
def test_no_writer_in_the_library_renames_files_itself():
    """SW-IO-13: outside jaxlora/io/_atomic.py no module of the library calls os.replace /
    os.rename or makes temporary files: every atomic write uses the one helper."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno} {hit}"
        for path in LIBRARY
        if path != ROOT / "jaxlora" / "io" / "_atomic.py"
        for node in _code_nodes(path)
        if (hit := _renames(node))
    ]
    assert offenders == [], offenders
    assert _renames(ast.parse("os.replace(a, b)").body[0].value) == "os.replace"
    assert _renames(ast.parse("from tempfile import mkstemp").body[0]) is not None


@pytest.mark.clause("SW-IO-13")
def test_file_names_are_defined_once():
    """SW-IO-13: the PEFT and checkpoint file names appear as string literals only in
    jaxlora/io/_names.py; every reader and writer imports them from there."""
    names = {v for k, v in vars(_names).items() if k.endswith("_NAME")}
    names |= set(_names.ADAPTER_PICKLE_NAMES)
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= names
    found = []
    for path in LIBRARY:
        if path == ROOT / "jaxlora" / "io" / "_names.py":
            continue
        for node in _code_nodes(path):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert found == [], found
