"""One forward pass per window over held-out text, keeping every pairwise layer distance."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class ScanMeasurement:
    model: str
    num_layers: int
    tokens: int
    window: int
    distances: dict[int, list[float]]  # n -> d(h_l, h_{l+n}) for l = 0 .. L-n
    block_influence: list[float]  # BI_l = 1 - E[cos(h_l, h_{l+1})]
    state_norms: list[float]  # mean ||h_l||, l = 0 .. L
    perplexity: dict  # of the model itself, non-overlapping windows (the --rank reference)
    seconds: float

    def distance(self, start: int, end: int) -> float:
        """d(h_start, h_end): how far the stream moves across layers [start, end)."""
        return self.distances[end - start][start]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["distances"] = {str(n): values for n, values in self.distances.items()}
        return data


def measure_model(model_dir: str | Path, ids, window: int, dtype, device, progress=None) -> ScanMeasurement:
    """Distances for every block size n at once: all states of a window are at hand,
    so the n = 1 .. L products cost little next to the forward pass."""
    from dus.measure.layerwise import LayerStats
    from dus.checkpoint import ModelDir, free
    from dus.measure.perplexity import count_windows, evaluate_stream

    started = time.perf_counter()
    model = ModelDir(model_dir).load_model(dtype, device, quiet=True).eval()
    stats = LayerStats(max_skip=None)
    advance = None
    if progress is not None:
        task = progress.add_task(f"scan {Path(model_dir).name}: {len(ids)} tokens", total=count_windows(len(ids), window, window))
        advance = lambda: progress.advance(task)  # noqa: E731
    result = evaluate_stream(model, ids, window, window, stats=stats, on_window=advance)
    free(model)
    return ScanMeasurement(
        model=str(model_dir),
        num_layers=stats.num_layers,
        tokens=stats.tokens,
        window=window,
        distances=stats.distance_matrix(),
        block_influence=stats.block_influence(),
        state_norms=stats.state_norms(),
        perplexity=result.to_dict(),
        seconds=time.perf_counter() - started,
    )
