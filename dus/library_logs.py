"""Library log lines that would send a dus user the wrong way, dropped where they are made."""

from __future__ import annotations

import logging

# (logger, start of the message) of each line dropped.
# bitsandbytes on a CPU with AVX512-BF16 asks for `pip install kernels` on every import (peft
# imports it, so on every heal): that package would download compiled code from the Hugging Face
# Hub, which dus never runs unasked, and without it bitsandbytes uses its own CPU kernels.
DROPPED = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def drop_misleading_library_logs() -> None:
    """Install the filters (once) on the loggers that make those lines, before the libraries load."""
    for name, start in DROPPED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))
