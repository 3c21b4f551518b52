"""Make data/heldout/legal.txt: legal prose, a held-out domain no healing, dev or tuning text
comes from (the other held-out kinds each have training data of a related kind).

Four license texts as their packages ship them: the GNU GPL v3 (PyPI ansible-core==2.19.14,
COPYING), the GNU LGPL v2.1 (paramiko==5.1.0, LICENSE), the GNU GPL v2 (pylint==4.1.4,
LICENSE) and the Mozilla Public License 2.0 (pathspec==1.1.1, LICENSE), in that order; each
paragraph on one line (whitespace collapsed, heading underlines dropped), blank lines between
paragraphs. The FSF's notice at the top of each GNU license permits verbatim copies of the
license document; the MPL 2.0 text is published by Mozilla for anyone to copy.

    python data/prepare_legal.py            # write data/heldout/legal.txt
    python data/prepare_legal.py --check    # rebuild in memory, compare with the committed file
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from package_files import read_checked_sdist_member, write_or_check  # noqa: E402

# (package, version, member in the sdist, sha256 of the member)
SOURCES = [
    ("ansible-core", "2.19.14", "ansible_core-2.19.14/COPYING",
     "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"),
    ("paramiko", "5.1.0", "paramiko-5.1.0/LICENSE",
     "5fa25bf5f395fd26e701c2e1de4ca7d162816986dc791c22f8f4226857ad1bb2"),
    ("pylint", "4.1.4", "pylint-4.1.4/LICENSE",
     "f97b14080de8b8490d60eb3d620ebc419943e0779466d1dd0d5d6f68fe195dcd"),
    ("pathspec", "1.1.1", "pathspec-1.1.1/LICENSE",
     "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85"),
]
OUTPUT = HERE / "heldout" / "legal.txt"


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, each joined onto one line with single spaces."""
    text = text.replace("\r\n", "\n").replace("\f", "\n")
    text = re.sub(r"(?m)^[ \t]*[=*-]{3,}[ \t]*$", "", text)  # heading underlines
    blocks = re.split(r"\n\s*\n", text)
    return [" ".join(block.split()) for block in blocks if block.strip()]


def build(allow_download: bool = True) -> str:
    parts = []
    for package, version, member, expected in SOURCES:
        found = read_checked_sdist_member(package, version, member, expected, allow_download=allow_download)
        if found is None:
            raise SystemExit(f"{package}=={version} not found locally and downloading is off")
        parts.extend(paragraphs(found[0].decode("utf-8")))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare a fresh build with the committed file")
    args = parser.parse_args(argv)
    return write_or_check({OUTPUT: build()}, args.check, HERE.parent, lambda text: f"{len(text.split()):,} words")


if __name__ == "__main__":
    sys.exit(main())
