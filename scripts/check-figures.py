#!/usr/bin/env python3
"""Nothing measured is lost: every figure in README.md and docs/*.md at a base commit (numbers
with a decimal point, a % or an x, and whole numbers with a unit) must still appear somewhere in README.md or docs/ now.

    python scripts/check-figures.py [BASE]     # BASE: a commit, e599915 by default (before issue 41)

Prints the figures that no longer appear (with the file and line they came from) and exits 1
if there are any. A one-off check for moving text between pages, not a test: it needs the
base commit in the git history."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"(?<![\w.])[+-]?\d[\d,]*(?:\.\d+)?(?:%|x\b)|(?<![\w.])[+-]?\d[\d,]*\.\d+(?:e-?\d+)?"
                    # and whole numbers with a unit: 93 MB, 431 s, 61K tokens, 1.48B parameters
                    r"|(?<![\w.])\d[\d,]*(?:\.\d+)?\s?(?:MB|GB|KB|MiB|GiB|KiB|TB|s|ms|min|minutes|seconds|tokens|"
                    r"steps|layers|words|passages|conversations|evaluations|candidates|rows|parameters|B|M|K)\b")


def figures(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [(number, match.group(0)) for match in FIGURE.finditer(line)]
    return found


def normal(figure: str) -> str:
    return figure.lstrip("+").replace(" ", "")


def main() -> int:
    base = sys.argv[1] if len(sys.argv) > 1 else "e599915"
    listed = subprocess.run(["git", "ls-tree", "-r", "--name-only", base, "--", "README.md", "docs"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    old = {path: subprocess.run(["git", "show", f"{base}:{path}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout for path in listed if path.endswith(".md")}
    now = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    present = set()
    for path in now:
        present |= {normal(figure) for _, figure in figures(path.read_text(encoding="utf-8"))}
    missing = []
    total = set()
    for path, text in old.items():
        for line, figure in figures(text):
            total.add(normal(figure))
            if normal(figure) not in present:
                missing.append(f"{path}:{line}: {figure}")
    print(f"{len(total)} distinct figures in README.md and docs/ at {base}; "
          f"{len(total) - len({m.rsplit(': ', 1)[1].lstrip('+') for m in missing})} still appear; {len(missing)} occurrences missing")
    for item in missing:
        print("missing", item)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
