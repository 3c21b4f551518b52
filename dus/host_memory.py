"""Host memory that a training process gives back.

glibc serves a large allocation with its own mmap and returns it on free, but each time
such a block is freed it raises that size threshold (up to 32 MiB). After the first
training step, activations and loss chunks below the new threshold are carved from the heap,
and a step's freed activations stay resident there: measured on the CPU heal of SmolLM2
SOLAR 44, about 400 MB of peak RSS that holds nothing. Fixing the threshold at glibc's own
default keeps every block above it returned on free. The price is a page fault per page of
each new large block, measured on the same heal (one thread, quiet machine): 3,067 MB and
10.3 s a step pinned against 3,651 MB and 8.6 s not. `DUS_PIN_MMAP_THRESHOLD=0` keeps
glibc's own policy: faster steps where memory is not short; a number of bytes pins the
threshold there instead (blocks below it are carved from the heap and reused).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from dus.errors import DusError

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h); setting it also stops the dynamic adjustment
MMAP_THRESHOLD = 128 * 1024  # glibc's default


def pinned_threshold() -> int | None:
    """The threshold `DUS_PIN_MMAP_THRESHOLD` asks for: unset or 1 -> glibc's default, 0 -> none,
    a larger number -> that many bytes."""
    value = os.environ.get("DUS_PIN_MMAP_THRESHOLD", "1").strip()
    try:
        number = int(value)
    except ValueError:
        raise DusError(f"DUS_PIN_MMAP_THRESHOLD={value!r} is not a number; use 0 (off), 1 (glibc's default, "
                       "128 KiB) or a threshold in bytes") from None
    if number < 0:
        raise DusError(f"DUS_PIN_MMAP_THRESHOLD={number} is negative; use 0 (off), 1 or a threshold in bytes")
    return None if number == 0 else MMAP_THRESHOLD if number == 1 else number


def keep_large_blocks_returnable() -> bool:
    """Pin glibc's mmap threshold; True where it took effect (Linux with glibc, not opted out)."""
    threshold = pinned_threshold()
    if threshold is None or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl has no mallopt
        return False
