"""The `dus` command line.

Each subcommand lives in its own module under `dus/commands/` and exposes
`register(app)`; this file only discovers them, so adding a command touches one file.
Heavy libraries (torch, transformers, trl) are imported inside the commands, keeping
`dus --help` fast. A plain `dus build` (the options written out, nothing for click to
resolve) does not even build the typer app: its arguments are read here and the same
command runs (dus.commands.build.run), a small build's start-up being mostly imports.
"""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import re
import sys

from dus.errors import DusError

_APP = None


def _app():
    """The typer app with every command registered (typer and its imports only now)."""
    global _APP
    if _APP is None:
        import typer

        _APP = typer.Typer(
            name="dus",
            help="Make a decoder-only model deeper from its own layers, heal the seam, measure.\n\n"
            "Example: dus build recipes/solar.yaml -o out/solar\n\n"
            "Then dus heal out/solar -o out/solar-healed, and dus compare them. "
            "Each command's --help starts with what it is for and an example; the docs are in docs/ (mkdocs serve).",
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
        )
        _register_commands(_APP)
    return _APP


def __getattr__(name: str):
    if name == "app":  # `from dus.cli import app`, as before
        return _app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_commands(app) -> None:
    import dus.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"dus.commands.{info.name}")
        module.register(app)


# `dus build`'s options that the fast path reads: option -> (parameter, takes a value)
_BUILD_OPTIONS = {
    "-o": ("output", True), "--output": ("output", True), "--solar": ("solar", True), "--trim": ("trim", True),
    "--force": ("force", False), "--shard-size": ("shard_size", True), "--dtype": ("dtype", True),
    "--dry-run": ("dry_run", False), "--quiet": ("quiet", False), "-q": ("quiet", False),
    "--verify-hashes": ("verify_hashes", False),
}


def _plain_build(argv: list[str]) -> dict | None:
    """The arguments of `dus build` when the command line is plain: known options, each at
    most once, `--opt VALUE` or `--opt=VALUE` with a value that is not empty and does not
    start with '-', --trim in digits, at most one RECIPE. Anything else (help, an unknown
    or repeated option, a value click would have to judge) is None: typer parses it,
    with its messages."""
    if not argv or argv[0] != "build":
        return None
    values: dict = {}
    recipe = None
    rest = argv[1:]
    index = 0
    while index < len(rest):
        token = rest[index]
        index += 1
        if not token or token == "-":
            return None
        if not token.startswith("-"):
            if recipe is not None:
                return None
            recipe = token
            continue
        name, equals, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in _BUILD_OPTIONS:
            return None
        parameter, takes_value = _BUILD_OPTIONS[name]
        if parameter in values:
            return None
        if takes_value:
            if not equals:
                if index >= len(rest):
                    return None
                value = rest[index]
                index += 1
            if not value or value.startswith("-"):
                return None
            values[parameter] = value
        elif equals:
            return None
        else:
            values[parameter] = True
    if "trim" in values:
        if not re.fullmatch(r"[0-9]{1,9}", values["trim"]):
            return None
        values["trim"] = int(values["trim"])
    from pathlib import Path

    if recipe is not None:
        values["recipe"] = Path(recipe)
    if "output" in values:
        values["output"] = Path(values["output"])
    return values


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
    plain = _plain_build(argv)
    try:
        if plain is not None:
            _run_plain_build(plain)
            return
        _run_typer(argv)
    except _user_errors() as error:
        if debug:
            raise
        print(f"dus: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)


def _run_plain_build(arguments: dict) -> None:
    """dus build, ended as typer ends a command: Ctrl-C is exit 130, end of input
    "Aborted!", a closed stdout a quiet exit 1."""
    from dus.commands.build import run

    try:
        run(**arguments)
    except EOFError:
        print(file=sys.stderr)
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as error:
        if error.errno != errno.EPIPE:
            raise
        try:
            from typer._click.utils import PacifyFlushWrapper
        except ImportError:  # typer built on the click package
            from click.utils import PacifyFlushWrapper

        sys.stdout = PacifyFlushWrapper(sys.stdout)
        sys.stderr = PacifyFlushWrapper(sys.stderr)
        sys.exit(1)


def _run_typer(argv: list[str]) -> None:
    import typer

    app = _app()
    clicks = _click_exceptions()
    no_args = getattr(clicks, "NoArgsIsHelpError", ())
    try:
        # not standalone: click's own errors come here instead of being drawn as boxes
        code = app(args=argv, prog_name="dus", standalone_mode=False)
    except no_args:  # bare `dus`: the help (printed as the error was made), as before
        sys.exit(2)
    except clicks.ClickException as error:
        print(f"dus: error: {usage_line(error, _command_of(app, argv))}", file=sys.stderr)
        sys.exit(error.exit_code)
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        sys.exit(1)
    if isinstance(code, int) and code:  # click's Exit(code), returned when not standalone
        sys.exit(code)


def _click_exceptions():
    """click's exception classes, as this typer raises them (typer 0.2x vendors click)."""
    try:
        from typer._click import exceptions
    except ImportError:  # typer built on the click package
        from click import exceptions
    return exceptions


def _command_of(app, argv: list[str]) -> str:
    """`dus COMMAND` when the command line names one of the app's commands, else `dus`."""
    names = {info.name for info in app.registered_commands if info.name}
    return f"dus {argv[0]}" if argv and argv[0] in names else "dus"


def usage_line(error, command: str = "dus") -> str:
    """A click usage error (unknown option, missing argument, bad value) on one line, with
    where to find the help: `No such option: --foo (see dus build --help)`. An error click
    raises while it parses a command's options has no context: `command` (the command the
    line names) is the help to point to then, as it is for the errors that have one."""
    message = " ".join(error.format_message().split())
    ctx = getattr(error, "ctx", None)
    return f"{message} (see {ctx.command_path if ctx is not None else command} --help)"
