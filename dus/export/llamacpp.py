"""Run an exported GGUF in llama.cpp (through llama-cpp-python) to check it against the
checkpoint: the consumer itself, not a reimplementation, decides whether the export is right.

llama-cpp-python is optional (`pip install llama-cpp-python`, a source build of a few
minutes); everything here raises a one-line DusError when it is missing.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dus.errors import DusError


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def open_gguf(path: Path, n_ctx: int = 512, threads: int | None = None):
    """A llama.cpp model with logits for every position, closed on exit."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise DusError("llama-cpp-python is not installed; `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
                       "llama-cpp-python` builds it (a few minutes)") from None
    try:
        model = Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                      verbose=False, seed=0)
    except ValueError as error:
        raise DusError(f"{path}: llama.cpp cannot load it ({error})") from None
    try:
        yield model
    finally:
        model.close()


def tokenize(model, text: str) -> list[int]:
    """llama.cpp's tokens for `text`, special tokens parsed, no BOS added."""
    return model.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def logits(model, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) logits of one window, from a fresh context."""
    model.reset()  # the next eval starts at position 0 and drops the cached keys/values
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)


def perplexity(path: Path, tokens: list[int], window: int, threads: int | None = None) -> tuple[float, float]:
    """Perplexity over non-overlapping windows (the first token of each is context only)
    and the tokens per second llama.cpp evaluated them at."""
    total, count, evaluated, seconds = 0.0, 0, 0, 0.0
    with open_gguf(path, n_ctx=window, threads=threads) as model:
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start:start + window]
            if len(chunk) < 2:
                break
            began = time.perf_counter()
            scores = logits(model, chunk)
            seconds += time.perf_counter() - began
            evaluated += len(chunk)
            shifted = scores[:-1] - scores[:-1].max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            total -= float(log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
    return math.exp(total / count), evaluated / seconds
