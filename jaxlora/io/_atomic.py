"""Atomic, durable writes of one file or one whole directory: the one helper every writer uses
(spec SW-IO-13).

- `atomic_write(path, data)`: the bytes go to a temporary file next to `path`, are fsynced,
  the file is renamed over `path` and the directory is fsynced. Readers see the old file or the
  new one, never a partial one, and after a power loss the new one is there once this returns.
- `atomic_directory(path)`: a context manager that yields a fresh temporary directory next to
  `path`; when the block ends normally every file and directory in it is fsynced and it
  replaces `path` in one step (Linux `renameat2(RENAME_EXCHANGE)`, else two renames rolled back
  on failure), then the parent is fsynced. If the block raises, `path` is untouched and the
  temporary directory is removed.
- `check_replaceable(path, is_ours, ...)`: refuse to replace a non-empty directory that does
  not hold what the writer writes (a user's unrelated files are never swapped away).

Temporary names start with `.<name>.tmp-`; new files and directories get the usual permissions
(the umask applies), unlike `tempfile`'s private 0600 / 0700.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(root / "out.txt", "hello\\n")
    >>> with atomic_directory(root / "ckpt") as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> (root / "out.txt").read_text(), (root / "ckpt" / "a.txt").read_text()
    ('hello\\n', 'new')
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import JaxLoraError

__all__ = ["atomic_directory", "atomic_write", "check_replaceable", "fsync_directory"]


def _temporary_name(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def fsync_directory(directory: str | os.PathLike) -> None:
    """Persist a directory's entries (new files, renames) across a power loss."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first) under `root`, `root` included."""
    for current, _, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(current, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(current)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace the file `path` with `data` (str is written as UTF-8) atomically and durably.

    Arguments:
        path: the file to create or replace; missing parent directories are created.
        data: the complete new content.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "r.jsonl")
        >>> atomic_write(p, b'{"a": 1}\\n'); open(p).read()
        '{"a": 1}\\n'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = _temporary_name(target, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux `renameat2(RENAME_EXCHANGE)`; False where the
    platform or file system cannot (the caller then falls back to two renames)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put the directory `tmp` at `target`; an existing `target` ends up at `tmp`."""
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):  # one atomic step: target is never missing
        return
    old = _temporary_name(target, "old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    os.replace(old, tmp)  # the caller removes tmp, as after an exchange


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place at `path`.

    Yields the temporary directory (empty, next to `path`). On a normal exit of the block the
    whole tree is fsynced and replaces `path` in one step (the previous directory, if any, is
    removed); on an exception `path` is left as it was. Call `check_replaceable` first when
    `path` may be a directory the caller did not write.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "model"
        >>> with atomic_directory(d) as tmp:
        ...     _ = (tmp / "config.json").write_text("{}")
        >>> sorted(p.name for p in d.iterdir())
        ['config.json']
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target, "tmp")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
        fsync_directory(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous directory, if there was one
    finally:
        if tmp.exists():  # the block or the swap failed (or the removal above did): clean up
            shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable(
    path: str | os.PathLike,
    is_ours: Callable[[Path], bool],
    *,
    error: type[JaxLoraError],
    what: str,
    writer: str,
) -> None:
    """Raise `error` unless `path` is absent, an empty directory, or a directory `is_ours`
    accepts (one `writer` wrote before); `what` names that content in the message.

    Example:
        >>> import tempfile, pathlib
        >>> from jaxlora.errors import CheckpointError
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "notes.txt").write_text("mine")
        >>> check_replaceable(d, lambda p: False, error=CheckpointError, what="a checkpoint",
        ...                   writer="save_hf_checkpoint")
        Traceback (most recent call last):
        ...
        jaxlora.errors.CheckpointError: ... without a checkpoint; refusing to replace it ...
    """
    target = Path(path)
    if not target.exists():
        return
    if not target.is_dir():
        raise error(f"{target} exists and is not a directory; refusing to replace it.")
    if any(target.iterdir()) and not is_ours(target):
        raise error(
            f"{target} is a non-empty directory without {what}; refusing to replace it "
            f"({writer} replaces the whole directory). Choose an empty or new path."
        )
