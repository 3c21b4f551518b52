"""Files dus ships beside its code: heal configs (train/), recipes (recipes/), the default
prompts and the small default data (data/).

In the repository they live at the top level, which stays their only source; a built
wheel carries copies under `dus/_shipped/` (setup.py puts them there). A path the user
gives is read from the working directory first; a shipped default is found either way,
so `dus heal MODEL -o OUT` works from any directory once dus is installed.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_COPY = Path(__file__).resolve().parent / "_shipped"  # inside an installed wheel
SOURCE_TREE = Path(__file__).resolve().parents[1]  # a checkout or an editable install

# What a wheel carries, relative to the repository root (setup.py reads this list).
SHIPPED = (
    "train/*.yaml",
    "recipes/*.yaml",
    "data/prompts.jsonl",
    "data/heldout.txt",
    "data/heldout/*.txt",
    "data/text/train.jsonl",
    "data/text/dev/*.txt",
    "data/chat/train.jsonl",
    "data/chat/heldout.jsonl",
    "data/selfinstruct/train.jsonl",
    "data/LICENSES/*",
    "data/README.md",
)


def shipped(relative: str | Path) -> Path | None:
    """The shipped copy of `relative` (e.g. "train/full.yaml"), or None."""
    for root in (PACKAGE_COPY, SOURCE_TREE):
        candidate = root / relative
        if candidate.exists():
            return candidate
    return None


def local_or_shipped(relative: str | Path) -> Path:
    """`relative` in the working directory if it is there, else the shipped copy, else the
    path as given (so the caller's "no such file" error names what the user wrote)."""
    path = Path(relative)
    if path.exists() or path.is_absolute():
        return path
    return shipped(path) or path
