"""One exception type for every mistake a user can fix.

The CLI prints a DusError as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class DusError(Exception):
    """A problem with the user's input, stated as: what is wrong, and how to fix it."""


def read_user_text(path, what: str) -> str:
    """A text file the user gave (recipe, config, data), or one line saying it is not text."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DusError(f"{path}: not a UTF-8 text file; give {what}") from None


def output_disk_error(error: BaseException, output) -> DusError | None:
    """A full disk (or quota) met while writing `output`, as one line naming the output's
    path, never the file that was being read when the write failed; None for other errors.
    numpy's `tofile` (the GGUF writer) reports a short write without an errno:
    "2048 requested and 1064 written"."""
    import errno
    import re

    if not isinstance(error, OSError):
        return None
    fix = "free space there or choose another output path"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return DusError(f"{output}: {what} on its disk, the write stopped part way and nothing was kept; {fix}")
    short = re.fullmatch(r"(\d+) requested and (\d+) written", str(error).strip())
    if error.errno is None and short:
        return DusError(f"{output}: the write stopped part way ({short[1]} bytes requested, {short[2]} written: "
                        f"no space left on its disk?) and nothing was kept; {fix}")
    return None


def file_not_model_directory(path) -> str:
    """What to say of a file given where a model directory is wanted (`m/config.json`, a
    weights file): it is a file, and the directory it is in is probably what was meant."""
    from pathlib import Path

    path = Path(path)
    parent = path.parent if str(path.parent) not in ("", ".") else Path.cwd()
    return f"{path} is a file, not a model directory; give its directory: {parent}"
