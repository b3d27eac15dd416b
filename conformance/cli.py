"""`python -m conformance`: run the suite against a driver, print a clause table, write JSON.

Exit status: 0 when no check failed (passes, "not supported", skips, xfails, or a skipped run
of an optional driver whose dependencies are missing), 1 when a check failed, 2 on a usage
error (unknown driver, a driver that fails to import or construct, unreadable skips/xfails
file, `--max-examples` or `--steps` below 1).

Example:
    $ python -m conformance --driver jaxlora --max-examples 20 --json report.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from jaxlora.errors import ConfigError

from .loader import BUILTIN, DriverLoadError, DriverUnavailable, load_driver
from .markdown import previous_appendix, previous_explanations, render_markdown
from .runner import FAIL, Report, RunConfig, read_id_file, run_suite

__all__ = ["format_table", "main", "write_json", "write_text"]

_MARK = {"pass": "PASS", "fail": "FAIL", "xfail": "xfail", "xpass": "XPASS"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Check a LoRA implementation against specs/switching.md, clause by clause.",
    )
    p.add_argument(
        "--driver",
        default="reference",
        help=f"{', '.join(sorted(BUILTIN))}, 'module:factory' or 'path/to/file.py:factory'",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=RunConfig.max_examples,
        metavar="N",
        help="Hypothesis examples per check (default %(default)s; more = slower, deeper)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=RunConfig.steps,
        metavar="N",
        help="operations per state-machine sequence (default %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="change the (otherwise fixed, derandomized) seeds; any int, 0 included, differs "
        "from the default run",
    )
    p.add_argument(
        "--clauses",
        default=None,
        metavar="PATTERN",
        help="comma-separated globs of clause IDs or check names, e.g. 'SW-MERGE-*'",
    )
    p.add_argument("--skips", default=None, metavar="FILE", help="ids to skip, one per line")
    p.add_argument("--xfails", default=None, metavar="FILE", help="ids expected to fail")
    p.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here")
    p.add_argument(
        "--markdown",
        default=None,
        metavar="FILE",
        help="write a Markdown deviation report here (keeps the explanations already in FILE)",
    )
    return p


def write_text(path: str | Path, text: str) -> None:
    """Write `text` atomically (temp file + `os.replace`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write `data` as JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_table(report: Report) -> str:
    """The clause x result table, then the details of every failure."""
    lines = [f"driver: {report.driver}"]
    if report.versions:
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()))
    width = max((len(c) for c in report.clauses), default=10)
    for cid, entry in report.clauses.items():
        status = _MARK.get(entry["status"], entry["status"])
        detail = _short(entry["message"].split("\n")[0], 70) if entry["status"] != "pass" else ""
        lines.append(f"  {cid:<{width}}  {status:<14}  {_short(entry['title'], 40):<40}  {detail}")
    failures = [c for c in report.checks if c.status == FAIL]
    for check in failures:
        lines += ["", f"FAIL {check.clause} in {check.name}: {check.message}"]
        if check.counterexample:
            lines += ["  smallest counterexample:"]
            lines += [f"    {line}" for line in check.counterexample.splitlines()[:25]]
    for kind, ids in report.unmatched.items():
        if ids:
            lines.append(f"warning: {kind} entries matching no check or clause: {ids}")
    counts = report.to_json()["summary"]
    lines += ["", "summary: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        skips = read_id_file(args.skips) if args.skips else ()
        xfails = read_id_file(args.xfails) if args.xfails else ()
    except OSError as e:
        print(f"error: cannot read the skips/xfails file: {e}", file=sys.stderr)
        return 2
    try:
        config = RunConfig(
            max_examples=args.max_examples,
            steps=args.steps,
            seed=args.seed,
            clauses=args.clauses,
            skips=skips,
            xfails=xfails,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        driver = load_driver(args.driver)
    except DriverUnavailable as e:
        print(f"skipped: {e}")
        if args.json:
            write_json(args.json, {"driver": args.driver, "status": "skipped", "reason": str(e)})
        return 0
    except DriverLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run_suite(driver, config)
    print(format_table(report))
    if args.json:
        write_json(args.json, report.to_json())
    if args.markdown:
        command = list(sys.argv[1:] if argv is None else argv)
        previous, appendix = (f(args.markdown) for f in (previous_explanations, previous_appendix))
        text = render_markdown(report, command, previous, appendix)
        write_text(args.markdown, text)
    return 1 if report.failed else 0
