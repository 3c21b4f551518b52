"""The `dus` command line.

Each subcommand lives in its own module under `dus/commands/` and exposes
`register(app)`; this file only discovers them, so adding a command touches one file.
Heavy libraries (torch, transformers, trl) are imported inside the commands, keeping
`dus --help` fast.
"""

from __future__ import annotations

import errno
import importlib
import os
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


ERRNO_FIXES = {
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the filesystem is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EISDIR: "that path is a directory: give a file",
}


def one_line(error: BaseException) -> str:
    """What went wrong and the fix, on one line, for the errors a user can act on."""
    if isinstance(error, DusError):
        return " ".join(str(error).split())  # messages quoting other tools may wrap
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or str(error) or type(error).__name__
        fix = ERRNO_FIXES.get(error.errno, "check the path and try again")
        return " ".join(f"{where}{reason}; {fix}".split())
    if isinstance(error, MemoryError):
        return "out of memory; use a smaller model, batch or --max-tokens, or a machine with more memory"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}; rerun with --debug for the full traceback"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that come from the user's files or machine, not from a bug in dus."""
    kinds: list[type[BaseException]] = [DusError, OSError, MemoryError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(kinds)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. An error the user can fix (a DusError, an OSError such as an unwritable
    output, a damaged file the libraries refuse) becomes one line on stderr and exit
    status 2; `--debug` anywhere on the command line (or DUS_DEBUG=1) shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DUS_DEBUG") == "1"
    argv = [arg for arg in argv if arg != "--debug"]
    clicks = _click_exceptions()
    no_args = getattr(clicks, "NoArgsIsHelpError", ())
    try:
        # not standalone: click's own errors come here instead of being drawn as boxes
        code = app(args=argv, prog_name="dus", standalone_mode=False)
    except no_args:  # bare `dus`: the help (printed as the error was made), as before
        sys.exit(2)
    except clicks.ClickException as error:
        print(f"dus: error: {usage_line(error)}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except _user_errors() as error:
        if debug:
            raise
        print(f"dus: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:  # click's Exit(code), returned when not standalone
        sys.exit(code)


def _click_exceptions():
    """click's exception classes, as this typer raises them (typer 0.2x vendors click)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer built on the click package
        from click import exceptions
    return exceptions


def usage_line(error) -> str:
    """A click usage error (unknown option, missing argument, bad value) on one line, with
    where to find the help: `No such option: --foo (see dus build --help)`."""
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    return f"{message} (see {ctx.command_path if ctx is not None else 'dus'} --help)"
