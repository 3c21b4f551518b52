"""What the in-memory heal recomputes in backward instead of keeping, against the model as
transformers builds it, in one process: SmolLM2-135M (models/), batch 4 x 256, layers 14-21
trained and every layer above them in the gradient's path (as the default heal's band).

Three copies of the model, stepped in turn (forward + backward; the first round is
warm-up): `plain`; `mlp`, the gated MLP that recomputes act(gate), and for the trained
layers the product, in backward (dus/heal/gated_mlp.py); `mlp+norms`, also the RMSNorms
that keep only their input (dus/heal/norms.py). For each: the median step and the bytes
autograd keeps for backward (saved-tensor hooks; weights and views of them not counted).
Writes benchmarks/results/recompute[-DTYPE].json (float32 without the suffix).

    OMP_NUM_THREADS=1 python benchmarks/bench_recompute.py [--dtype bfloat16] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODEL = REPO / "models" / "SmolLM2-135M-Instruct"
TRAINED = range(14, 22)


def variants(dtype):
    import torch

    from dus.checkpoint import ModelDir
    from dus.heal.gated_mlp import recompute_activations
    from dus.heal.norms import recompute_norms

    plain = ModelDir(MODEL).load_model(getattr(torch, dtype), quiet=True).train()
    mlp = copy.deepcopy(plain)
    recompute_activations(mlp.model.layers)
    both = copy.deepcopy(mlp)
    recompute_norms(both.model.layers)
    models = {"plain": plain, "mlp": mlp, "mlp+norms": both}
    for model in models.values():
        model.requires_grad_(False)
        for index in TRAINED:
            model.model.layers[index].requires_grad_(True)
    return models


def step(model, ids) -> tuple[float, int]:
    from dus.heal.kept import kept_for_backward

    started = time.perf_counter()
    with kept_for_backward(model) as kept:
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    hidden.float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, sum(kept.values())


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    models = variants(args.dtype)
    ids = torch.randint(0, models["plain"].config.vocab_size, (4, 256))
    times: dict[str, list[float]] = {name: [] for name in models}
    kept: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, model in models.items():
            seconds, kept[name] = step(model, ids)
            times[name].append(seconds)
    median = {name: statistics.median(values[1:]) for name, values in times.items()}
    result = {
        "model": str(MODEL.relative_to(REPO)), "dtype": args.dtype, "batch": [4, 256],
        "trained_layers": [TRAINED.start, TRAINED.stop], "threads": torch.get_num_threads(), "seconds": times,
        "median_seconds": median,
        "time_ratio_over_plain": {name: median[name] / median["plain"] for name in models},
        "kept_for_backward_mb": {name: value / 2**20 for name, value in kept.items()},
        "kept_mb_saved": {name: (kept["plain"] - value) / 2**20 for name, value in kept.items()},
    }
    suffix = "" if args.dtype == "float32" else f"-{args.dtype}"
    out = REPO / "benchmarks" / "results" / f"recompute{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
