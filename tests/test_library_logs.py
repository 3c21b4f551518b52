"""Library log lines that point a dus user the wrong way are dropped, and nothing else is."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

from dus.library_logs import DROPPED  # importing dus installs the filters


def test_the_dropped_lines_are_dropped_and_others_pass(caplog):
    caplog.set_level(logging.WARNING)
    for name, start in DROPPED:
        logger = logging.getLogger(name)
        logger.warning(start + " from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("an unrelated warning of %s", name)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [f"an unrelated warning of {name}" for name, _ in DROPPED]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_importing_peft_after_dus_prints_no_kernel_hint():
    hint = DROPPED[0][1]
    alone = subprocess.run([sys.executable, "-c", "import peft"], capture_output=True, text=True, timeout=300)
    if hint not in alone.stderr:
        pytest.skip("bitsandbytes prints no kernel hint on this CPU (it needs AVX512-BF16)")
    after_dus = subprocess.run([sys.executable, "-c", "import dus, peft"], capture_output=True, text=True, timeout=300)
    assert after_dus.returncode == 0, after_dus.stderr
    assert hint not in after_dus.stderr
