"""Subcommands of the `jaxlora` CLI: each module has `add_arguments(parser)` and `run(args)`."""
