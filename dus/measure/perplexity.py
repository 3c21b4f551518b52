"""Sliding-window perplexity (the strided method in the transformers docs): windows of
`window` tokens advance by `stride`; each window scores only the tokens no earlier
window scored, so with stride < window every token after the first is scored exactly
once, with at least `window - stride` tokens of context. With stride == window (no
overlap) the first token of each window has no context and is not scored; the number
of tokens scored is always reported.

The same forward pass can feed per-layer statistics for exactly the scored tokens,
so `dus compare` reads perplexity and layer diagnostics from one pass per window.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

from dus.errors import DusError


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first: int  # first token scored; tokens [first, end) are scored


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    tokens: int  # tokens scored

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "tokens_scored": self.tokens}


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows scoring each token at most once: tokens 1 .. num_tokens-1 when stride < window."""
    if window < 2:
        raise DusError(f"--window {window} is too short; use at least 2 tokens")
    if not 1 <= stride <= window:
        raise DusError(f"--stride {stride} must be between 1 and the window length {window}")
    windows = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first = max(previous_end, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def evaluate_stream(model, ids, window: int, stride: int, stats=None, score: bool = True, on_window=None) -> PerplexityResult:
    """Score the 1-D token stream `ids`; feed the scored tokens' hidden states to
    `stats` (a LayerStats) when given. `score=False` skips the vocabulary projection
    of all but one position (for scans that only need hidden states)."""
    import torch

    from dus.measure.layerwise import capture_layer_states

    device = next(model.parameters()).device
    nll_sum, scored = 0.0, 0
    capture = capture_layer_states(model) if stats is not None else nullcontext([])
    # The layer statistics of one window are summed on a worker thread while the next
    # window runs through the model (torch releases the GIL): on a machine with a core
    # to spare they cost no wall time. One window in flight at most.
    pending = None
    with torch.inference_mode(), capture as states, ThreadPoolExecutor(max_workers=1) as worker:
        for win in sliding_windows(len(ids), window, stride):
            states.clear()
            chunk = ids[win.begin : win.end].unsqueeze(0).to(device)
            keep = win.end - win.first + 1 if score else 1
            output = model(input_ids=chunk, use_cache=False, logits_to_keep=keep)
            if score:
                nll, count = window_nll(output.logits, chunk, win)
                nll_sum, scored = nll_sum + nll, scored + count
            if stats is not None:
                if pending is not None:
                    pending.result()
                pending = worker.submit(_update_stats, stats, [state[0, win.first - win.begin :] for state in states])
            if on_window is not None:
                on_window()
        if pending is not None:
            pending.result()
    return PerplexityResult(nll_sum, scored)


def window_nll(logits, chunk, win: Window) -> tuple[float, int]:
    """(summed NLL, tokens scored) of a batch of same-shape windows fed as `chunk` (B x L),
    from the model's logits for its last `win.end - win.first + 1` positions."""
    import torch.nn.functional as F

    # Logits at positions first-1 .. end-2 predict tokens first .. end-1.
    logits = logits[:, :-1].float().flatten(0, 1)
    targets = chunk[:, win.first - win.begin :].flatten()
    return F.cross_entropy(logits, targets, reduction="sum").item(), targets.numel()


def _update_stats(stats, states) -> None:
    import torch

    with torch.inference_mode():
        stats.update(states)


def count_windows(num_tokens: int, window: int, stride: int) -> int:
    return len(sliding_windows(num_tokens, window, stride))
