"""One exception type for every mistake a user can fix.

The CLI prints a DusError as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class DusError(Exception):
    """A problem with the user's input, stated as: what is wrong, and how to fix it."""
