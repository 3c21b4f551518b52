"""The gated MLP that recomputes act(gate) in backward, against the model as transformers
builds it, in one process: SmolLM2-135M (models/), float32, batch 4 x 256, layers 14-21
trained and every layer above them in the gradient's path (as the default heal's band).

Alternating forward + backward steps of the plain and the patched copy (the first of each
is warm-up), and the bytes each keeps for backward (saved-tensor hooks, parameters not
counted). Writes benchmarks/results/gated-mlp.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_gated_mlp.py
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    import torch

    from dus.checkpoint import ModelDir
    from dus.heal.gated_mlp import recompute_activations

    torch.manual_seed(0)
    plain = ModelDir(MODEL).load_model(torch.float32, quiet=True).train()
    patched = copy.deepcopy(plain)
    recompute_activations(patched.model.layers)
    for model in (plain, patched):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for layer in model.model.layers[14:22]:
            for parameter in layer.parameters():
                parameter.requires_grad_(True)
    ids = torch.randint(0, plain.config.vocab_size, (4, 256))

    def step(model) -> tuple[float, int]:
        kept: dict[int, int] = {}

        def pack(tensor):
            if not isinstance(tensor, torch.nn.Parameter):
                kept.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            return tensor

        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        hidden.square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, sum(kept.values())

    times: dict[str, list[float]] = {"plain": [], "patched": []}
    kept = {}
    for _ in range(7):
        for name, model in (("plain", plain), ("patched", patched)):
            seconds, kept[name] = step(model)
            times[name].append(seconds)
    result = {
        "model": str(MODEL.relative_to(REPO)), "batch": [4, 256], "trained_layers": [14, 22], "threads": torch.get_num_threads(),
        "seconds": times, "median_seconds": {k: statistics.median(v[1:]) for k, v in times.items()},
        "kept_for_backward_mb": {k: v / 2**20 for k, v in kept.items()},
    }
    result["time_ratio_patched_over_plain"] = result["median_seconds"]["patched"] / result["median_seconds"]["plain"]
    result["kept_mb_saved"] = result["kept_for_backward_mb"]["plain"] - result["kept_for_backward_mb"]["patched"]
    out = REPO / "benchmarks" / "results" / "gated-mlp.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
