"""Build the wheel, install it without extras into a fresh venv and use it there (SW-PKG-2).

Run by `make check-wheel` (part of `make test`, so of `.ci/run`):

    $ python tools/check_wheel.py            # everything in a temporary directory, removed after
    $ python tools/check_wheel.py --keep     # keep it (the path is printed) to look around

Checks: the wheel holds the top-level packages `jaxlora` (with `py.typed`) and `conformance` and
nothing else; in the fresh venv, run from an empty directory (so the checkout is not on
`sys.path`), `python -m jaxlora --help` exits 0, `jaxlora demo` and `jaxlora demo-llama` exit 0
(`JAXLORA_CACHE` in the temporary directory), and `import benchmarks` fails, as do `tests`,
`torch`, `transformers` and `peft` (test dependencies only). Needs the package registry for the
build backend and the dependencies; exits 1 naming the first check that failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"jaxlora", "conformance"}
#: importable from a checkout, never from the installed wheel without extras
ABSENT = ("benchmarks", "tests", "torch", "transformers", "peft")
#: not copied into the build tree (what .gitignore keeps out of a clean clone, and .git)
IGNORED = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".hypothesis")
IGNORED += (".pytest_cache", ".ruff_cache", ".cache", "reports", "*.pyc")


class CheckFailed(Exception):
    """A check of the wheel failed; the message says which and shows the output."""


def run(
    cmd: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, fails: bool = False
) -> str:
    """Run `cmd`, echo it, return its stdout + stderr; raise CheckFailed when its exit status
    is not 0 (or, with `fails`, when it is 0)."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    out = done.stdout + done.stderr
    if (done.returncode == 0) == fails:
        raise CheckFailed(f"{cmd[-1]!r} exited with status {done.returncode}:\n{out}")
    return out


def build_wheel(tmp: Path) -> Path:
    """Build the wheel from a copy of the working tree (the build writes into its tree)."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*IGNORED))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("jaxlora-*.whl")
    return wheel


def check_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    if top != PACKAGES:
        raise CheckFailed(
            f"the wheel's top-level packages are {sorted(top)}, expected {sorted(PACKAGES)}: "
            "see [tool.setuptools.packages.find] in pyproject.toml"
        )
    for needed in ("jaxlora/py.typed", "jaxlora/__main__.py", "conformance/__main__.py"):
        if needed not in names:
            raise CheckFailed(f"the wheel lacks {needed}")
    print(f"ok: {wheel.name} holds {', '.join(sorted(top))} ({len(names)} files)", flush=True)


def check_installed(wheel: Path, tmp: Path) -> None:
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    run([python, "-m", "pip", "install", "-q", wheel], cwd=tmp)
    here = tmp / "run"  # an empty working directory: the checkout is not importable from it
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"JAXLORA_CACHE": str(tmp / "cache"), "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}

    out = run([python, "-m", "jaxlora", "--help"], cwd=here, env=env)
    if "demo" not in out or "python -m benchmarks" not in out:
        raise CheckFailed(f"`python -m jaxlora --help` lists no demo or benchmarks note:\n{out}")
    print("ok: python -m jaxlora --help", flush=True)

    for demo in ("demo", "demo-llama"):  # `make demo`'s main job, and the Llama + PEFT files demo
        print(run([bin_dir / "jaxlora", demo], cwd=here, env=env).rstrip(), flush=True)
        print(f"ok: jaxlora {demo}", flush=True)

    for name in ABSENT:
        out = run([python, "-c", f"import {name}"], cwd=here, env=env, fails=True)
        if f"No module named '{name}'" not in out:
            raise CheckFailed(f"`import {name}` failed for another reason than its absence:\n{out}")
    print(f"ok: import {', '.join(ABSENT)} fail there (no such module)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="jaxlora-wheel-"))
    try:
        wheel = build_wheel(tmp)
        check_contents(wheel)
        check_installed(wheel, tmp)
    except CheckFailed as e:
        print(f"check-wheel FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print("check-wheel: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
