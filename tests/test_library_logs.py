"""Library log lines that point a dus user the wrong way are dropped, and nothing else is."""

from __future__ import annotations

import importlib.util
import logging
import os
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


@pytest.mark.parametrize("allow", [None, "1"])
def test_compiled_code_from_the_hub_is_refused_unless_allowed(allow):
    """transformers installs `kernels`; bitsandbytes (imported by peft) asks it for compiled code
    from the Hub on AVX512-BF16 CPUs. After `import dus` its get_kernel refuses, unless allowed."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the kernels package is not installed")
    code = ("import dus, kernels\nfrom kernels import get_kernel\n"
            "try:\n    get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\nexcept Exception as e:\n    print('TRIED', type(e).__name__)\n")
    env = {k: v for k, v in os.environ.items() if k != "DUS_ALLOW_HUB_KERNELS"}
    env["HF_HUB_OFFLINE"] = "1"  # an allowed call must not reach the network in a test
    if allow:
        env["DUS_ALLOW_HUB_KERNELS"] = allow
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout
    if allow:
        assert "TRIED" in out and "REFUSED" not in out  # kernels' own answer (offline here), not dus's refusal
    else:
        assert "REFUSED dus does not load compiled code from the Hub" in out
