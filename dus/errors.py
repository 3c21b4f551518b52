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
