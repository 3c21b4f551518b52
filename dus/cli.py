"""The `dus` command line.

Each subcommand lives in its own module under `dus/commands/` and exposes
`register(app)`; this file only discovers them, so adding a command touches one file.
Heavy libraries (torch, transformers, trl) are imported inside the commands, keeping
`dus --help` fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from dus.errors import DusError

app = typer.Typer(
    name="dus",
    help="Depth up-scaling for Hugging Face decoder-only models: build, heal, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    import dus.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"dus.commands.{info.name}")
        module.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a DusError becomes one line on stderr and exit status 2."""
    try:
        app(args=argv, prog_name="dus")
    except DusError as error:
        one_line = " ".join(str(error).split())  # messages quoting other tools may wrap
        print(f"dus: error: {one_line}", file=sys.stderr)
        sys.exit(2)
