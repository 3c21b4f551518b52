"""Host memory that a training process gives back, when memory is short (opt-in).

glibc serves a large allocation with its own mmap and returns it on free, but each time
such a block is freed it raises that size threshold (up to 32 MiB). After the first
training step, activations and gradients below the new threshold are carved from the heap
and reused there: no page faults, but some freed memory stays resident across the peak.
Pinning the threshold at glibc's own default (`DUS_PIN_MMAP_THRESHOLD=1`) returns every
block above it on free, at the price of a page fault per page of each new block, every step.

Measured on the CPU heal (2026-11-30, after the fused loss chunks; two threads, one run each,
`benchmarks/bench_heal_phases.py`): on SmolLM2 SOLAR 44 the pin took the peak from 3,174 to
2,739 MB and the step from 4.7 to 7.9 s; on a bf16 1.5B band heal from 9,469 to 8,937 MB and
from 4.3 to 7.8 s (the band's gradients and the activations are fresh mappings every step).
So glibc's policy is the default, and the pin is for a machine where those hundreds of
megabytes decide whether a heal fits. A number of bytes pins the threshold there instead
(blocks below it are carved from the heap and reused).
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
    """The threshold `DUS_PIN_MMAP_THRESHOLD` asks for: unset or 0 -> none (glibc's own policy),
    1 -> glibc's default threshold, a larger number -> that many bytes."""
    value = os.environ.get("DUS_PIN_MMAP_THRESHOLD", "0").strip()
    try:
        number = int(value)
    except ValueError:
        raise DusError(f"DUS_PIN_MMAP_THRESHOLD={value!r} is not a number; use 0 (off, the default), 1 "
                       "(glibc's default threshold, 128 KiB) or a threshold in bytes") from None
    if number < 0:
        raise DusError(f"DUS_PIN_MMAP_THRESHOLD={number} is negative; use 0 (off), 1 or a threshold in bytes")
    return None if number == 0 else MMAP_THRESHOLD if number == 1 else number


def keep_large_blocks_returnable() -> bool:
    """Pin glibc's mmap threshold where `DUS_PIN_MMAP_THRESHOLD` asks for it; True where it took
    effect (Linux with glibc)."""
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
