"""The `jaxlora` command. Each subcommand lives in its own module under `jaxlora.commands`
and is imported only when used.

Example:
    $ jaxlora demo
    $ jaxlora --help
    $ python -m jaxlora --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module under jaxlora.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo_tasks", "train small adapters on character tasks, then run them in one batch"),
    "demo-llama": ("demo_llama", "PEFT adapters on a tiny Llama, one mixed batch checked per row"),
    "switch-demo": ("demo", "switch one jitted forward through 8 adapters, checked vs NumPy"),
    "generate": ("generate", "generate from JSONL requests, each on its own adapter"),
    "inspect": ("inspect", "list the adapters of a PEFT directory and whether they load"),
    "serve": ("serve", "serve many adapters over HTTP (OpenAI API, continuous batching)"),
    "compare": ("compare", "per-request divergence between two adapters, offline"),
    "train": ("train", "fine-tune LoRA adapters on a JSONL dataset, several at once"),
}

#: the benchmarks are not part of the installed package (SW-PKG-2)
EPILOG = "Benchmarks run from a git checkout of jaxlora: python -m benchmarks --help"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `jaxlora` console script; returns the exit code.

    Only the module of the command being run is imported, so a command's heavy (or broken)
    dependencies never affect the others or `jaxlora --help`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(
        prog="jaxlora",
        description="jaxlora: many LoRA adapters on one base model, switched by pure functions.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(f"jaxlora.commands.{module}")
            mod.add_arguments(cmd)
            cmd.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
