"""llama.cpp's own quantizer (through llama-cpp-python) for the types the `gguf` package
cannot write: K-quants and the legacy 4/5-bit types, with an optional importance matrix.

llama.cpp chooses per tensor what a file type means (Q4_K_M keeps some ffn_down and
attn_v at Q6_K, the output head at Q6_K ...); reimplementing that choice would give files
that differ from everyone else's Q4_K_M, so dus hands the finished f16/bf16 GGUF to
`llama_model_quantize` and only checks the binding it calls through.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING


from dus.errors import DusError

if TYPE_CHECKING:
    import numpy as np

# dus name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* suffix. Types that need an importance matrix
# for every tensor (IQ1/IQ2/IQ3_XXS, Q2_K_S) are left out: dus would have to refuse them
# without --imatrix, and they are poor choices for the models dus builds.
LLAMA_TYPES = {
    "q6_k": "Q6_K",
    "q5_k_m": "Q5_K_M",
    "q5_k_s": "Q5_K_S",
    "q5_1": "Q5_1",
    "q5_0": "Q5_0",
    "q4_k_m": "Q4_K_M",
    "q4_k_s": "Q4_K_S",
    "q4_1": "Q4_1",
    "q4_0": "Q4_0",
    "iq4_xs": "IQ4_XS",
    "iq4_nl": "IQ4_NL",
    "q3_k_l": "Q3_K_L",
    "q3_k_m": "Q3_K_M",
    "q3_k_s": "Q3_K_S",
    "q2_k": "Q2_K",
}
INSTALL = "pip install 'dus[llama]' (llama-cpp-python>=0.3.36; it compiles llama.cpp, a few minutes)"


def _binding():
    """llama_cpp's low-level module, checked to have the quantizer dus calls as dus calls it."""
    try:
        import llama_cpp
    except ImportError:
        raise DusError(f"--type needs llama.cpp's quantizer, and llama-cpp-python is not installed: {INSTALL}") from None
    params = getattr(llama_cpp, "llama_model_quantize_params", None)
    entry = getattr(llama_cpp, "llama_model_imatrix_data", None)
    fields = dict(getattr(params, "_fields_", []))
    entry_fields = [name for name, _ in getattr(entry, "_fields_", [])]
    if (not hasattr(llama_cpp, "llama_model_quantize") or entry_fields != ["name", "data", "size"]
            or fields.get("imatrix") is not ctypes.POINTER(entry)):
        version = getattr(llama_cpp, "__version__", "?")
        raise DusError(f"llama-cpp-python {version} has a quantizer whose parameters dus cannot fill (its imatrix "
                       f"field is not a pointer to llama_model_imatrix_data {{name, data, size}}): {INSTALL}")
    return llama_cpp


def check_available(type_name: str) -> None:
    """Fail before any work when the quantizer for `type_name` is missing."""
    llama_cpp = _binding()
    if not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_TYPES[type_name]}"):
        raise DusError(f"llama-cpp-python {llama_cpp.__version__} has no {LLAMA_TYPES[type_name]} file type; "
                       f"{INSTALL}")


def quantize(source: Path, output: Path, type_name: str, imatrix: dict[str, np.ndarray] | None = None,
             threads: int | None = None) -> list[str]:
    """Quantize the GGUF `source` into `output` (which the caller makes atomic); return notes.

    `imatrix` maps GGUF tensor names to per-input-column mean squared activations (for
    stacked experts, one block of columns per expert), as llama-quantize passes them."""
    llama_cpp = _binding()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_TYPES[type_name]}")
    params.nthread = int(threads or os.cpu_count() or 1)
    keep = []  # the arrays and names must outlive the call
    if imatrix:
        import numpy as np  # here, not at the top: `dus --help` and every other command read LLAMA_TYPES

        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for slot, name in zip(entries, sorted(imatrix)):
            values = np.ascontiguousarray(imatrix[name], dtype=np.float32)
            encoded = name.encode("utf-8")
            keep += [values, encoded]
            slot.name = encoded
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        entries[len(imatrix)].name = None  # the terminator llama.cpp stops at
        keep.append(entries)
        params.imatrix = entries
    with _captured_log(llama_cpp) as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), ctypes.byref(params))
    if status != 0:
        errors = [line for level, line in log if level == ERROR] or ["no error logged"]
        raise DusError(f"llama.cpp's quantizer failed on {source.name} -> {type_name}: {errors[-1]}; "
                       "DUS_LLAMA_LOG=1 shows its whole log")
    for _, line in log:
        fallback = FALLBACK.search(line)
        if fallback:
            return [f"llama.cpp quantized {fallback.group(1)} of {fallback.group(2)} tensors with another type, their rows "
                    "not being a multiple of the type's block (256 values for K-quants); DUS_LLAMA_LOG=1 lists them"]
    return []


FALLBACK = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5


class _captured_log:
    """llama.cpp's log (hundreds of lines for one model) kept as (level, line) pairs instead of
    printed, unless DUS_LLAMA_LOG=1; the binding's own logger is put back afterwards."""

    def __init__(self, llama_cpp):
        self.llama_cpp = llama_cpp
        self.lines: list[tuple[int, str]] = []
        self.echo = os.environ.get("DUS_LLAMA_LOG") == "1"

    def __enter__(self):
        def collect(level, text, _user_data):
            line = text.decode("utf-8", "replace")
            if self.echo:
                print(line, end="", file=sys.stderr, flush=True)
            if level == 5 and self.lines:  # a continuation of the previous line
                self.lines[-1] = (self.lines[-1][0], self.lines[-1][1] + line.rstrip("\n"))
            else:
                self.lines.append((level, line.rstrip("\n")))

        self.callback = self.llama_cpp.llama_log_callback(collect)  # referenced until __exit__
        self.llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))
        return self.lines

    def __exit__(self, *exc):
        from llama_cpp import _logger

        self.llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        return False
