"""`dus scan --rank K`: build candidate recipes for real and rank them by the perplexity
they have before any healing, on the same tokens and windows as the scan."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from dus.scan.propose import Candidate


def rank_candidates(model_dir: str | Path, candidates: list[Candidate], num_layers: int, ids, window: int, dtype, device, progress=None, workdir: str | Path | None = None) -> list[dict]:
    """Build each candidate into a temporary directory (one at a time, deleted after
    measuring), score it, and return the results best first."""
    from dus.build import build_model
    from dus.checkpoint import ModelDir, free
    from dus.measure.perplexity import count_windows, evaluate_stream

    model = str(Path(model_dir).resolve())
    task = None
    if progress is not None:
        task = progress.add_task(f"rank {len(candidates)} candidates", total=len(candidates) * count_windows(len(ids), window, window))
    results = []
    with tempfile.TemporaryDirectory(prefix="dus-scan-rank-", dir=workdir) as tmp:
        for candidate in candidates:
            started = time.perf_counter()
            target = Path(tmp) / candidate.name
            build_model(candidate.recipe(model, num_layers), target)
            built = ModelDir(target).load_model(dtype, device, quiet=True).eval()
            advance = (lambda: progress.advance(task)) if progress is not None else None
            scored = evaluate_stream(built, ids, window, window, on_window=advance)
            free(built)
            shutil.rmtree(target)
            results.append({**candidate.to_dict(), **scored.to_dict(), "seconds": time.perf_counter() - started})
    return sorted(results, key=lambda r: r["perplexity"])
